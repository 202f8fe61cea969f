-- Claim tickers for a write of holdings: note the time of the claim for
-- each ticker the market prices (so no prune drops it for CLAIM_GRACE_MS),
-- and answer their prices.  Tickers not in the market are left to
-- market_bootstrap.lua.
-- KEYS[1] prices hash  KEYS[2] claims hash (ticker -> Redis ms of the last claim)
-- ARGV    tickers
-- Returns {claim time in ms, price or false, ...} in the order of ARGV.
local now = now_ms()
local out = {tostring(now)}
for i = 1, #ARGV do
  local price = redis.call('HGET', KEYS[1], ARGV[i])
  if price then
    redis.call('HSET', KEYS[2], ARGV[i], now)
  end
  out[#out + 1] = price
end
return out
