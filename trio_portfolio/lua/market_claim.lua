-- Claim tickers for a write of holdings: record the claiming session as a
-- holder of each ticker the market prices, with the time of the claim (so
-- no prune or let-go drops it while the write is in flight), and answer
-- their prices.  Tickers not in the market are left to market_bootstrap.lua.
-- KEYS[1] prices hash  KEYS[2] held cutoff (see trim_holders in market_lib.lua)
-- ARGV[1] the claiming session  ARGV[2] the holders key prefix (holders of
--         T = ARGV[2] .. T; same {market} hash tag as KEYS)
-- ARGV[3..] tickers
-- Returns {claim time in ms, price or false, ...} in the order of the tickers.
local now = now_ms()
local cutoff = redis.call('GET', KEYS[2])
local out = {tostring(now)}
for i = 3, #ARGV do
  local price = redis.call('HGET', KEYS[1], ARGV[i])
  if price then
    add_holder(ARGV[2], ARGV[i], ARGV[1], now, cutoff)
  end
  out[#out + 1] = price
end
return out
