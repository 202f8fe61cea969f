-- Bring tickers new to the market in (claimed, as market_claim.lua does),
-- unless another process already did, and never past the cap of the universe.
-- KEYS[1] prices hash (ticker -> latest price)
-- KEYS[2] history hash (ticker -> packed history: little-endian float64, hex)
-- KEYS[3] claims hash (ticker -> Redis ms of the last claim)
-- ARGV[1] the most tickers the market may price
-- ARGV[2..] ticker, packed bootstrapped history, initial price, ... (triplets)
-- Returns {'ok', ticker, price, ticker, price, ...} with the price now stored
-- (ours, or the one another process stored first), or {'ticker_limit',
-- tickers priced now} when the new ones would not fit: nothing written.
local new = 0
for i = 2, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    new = new + 1
  end
end
local size = redis.call('HLEN', KEYS[1])
if size + new > tonumber(ARGV[1]) then
  return {'ticker_limit', tostring(size)}
end
local now = now_ms()
local out = {'ok'}
for i = 2, #ARGV, 3 do
  local ticker = ARGV[i]
  local current = redis.call('HGET', KEYS[1], ticker)
  if not current then
    redis.call('HSET', KEYS[2], ticker, ARGV[i + 1])
    redis.call('HSET', KEYS[1], ticker, ARGV[i + 2])
    current = ARGV[i + 2]
  end
  redis.call('HSET', KEYS[3], ticker, now)
  out[#out + 1] = ticker
  out[#out + 1] = current
end
return out
