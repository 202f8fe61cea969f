-- Bring tickers new to the market in, unless another process already did.
-- KEYS[1]  prices hash (ticker -> latest price)
-- KEYS[2]  history hash (ticker -> packed history: little-endian float64, hex)
-- ARGV     ticker, packed bootstrapped history, initial price, ... (triplets)
-- Returns ticker, price, ticker, price, ... with the price now stored
-- (ours, or the one another process stored first).
local out = {}
for i = 1, #ARGV, 3 do
  local ticker = ARGV[i]
  local current = redis.call('HGET', KEYS[1], ticker)
  if not current then
    redis.call('HSET', KEYS[2], ticker, ARGV[i + 1])
    redis.call('HSET', KEYS[1], ticker, ARGV[i + 2])
    current = ARGV[i + 2]
  end
  out[#out + 1] = ticker
  out[#out + 1] = current
end
return out
