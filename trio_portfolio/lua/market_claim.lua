-- Claim tickers for a write of holdings: note the time of the claim for
-- each ticker the market prices (so no prune drops it for CLAIM_GRACE_MS)
-- and who claimed it (so no let-go drops it while the write is in flight),
-- and answer their prices.  Tickers not in the market are left to
-- market_bootstrap.lua.
-- KEYS[1] prices hash  KEYS[2] claims hash (ticker -> Redis ms of the last claim)
-- KEYS[3] held cutoff (see trim_holders in market_lib.lua)
-- ARGV[1] the claiming session  ARGV[2] the holders key prefix (holders of
--         T = ARGV[2] .. T; same {market} hash tag as KEYS)
-- ARGV[3..] tickers
-- Returns {claim time in ms, price or false, ...} in the order of the tickers.
local now = now_ms()
local cutoff = redis.call('GET', KEYS[3])
local out = {tostring(now)}
for i = 3, #ARGV do
  local price = redis.call('HGET', KEYS[1], ARGV[i])
  if price then
    redis.call('HSET', KEYS[2], ARGV[i], now)
    add_holder(ARGV[2], ARGV[i], ARGV[1], now, cutoff)
  end
  out[#out + 1] = price
end
return out
