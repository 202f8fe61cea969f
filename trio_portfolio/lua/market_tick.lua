-- Store one tick of prices, fenced on the tick counter.
-- KEYS[1]      prices hash
-- KEYS[2]      tick counter
-- KEYS[3..n]   history list of each ticker in ARGV, in the same order
-- ARGV[1]      the tick number the caller read (fence)
-- ARGV[2]      history length cap
-- ARGV[3..]    ticker, price, ticker, price, ...
-- Returns the new tick number, or nil if another process advanced first.
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= tonumber(ARGV[1]) then return nil end
local cap = tonumber(ARGV[2])
local k = 3
for i = 3, #ARGV, 2 do
  local ticker, price = ARGV[i], ARGV[i + 1]
  redis.call('HSET', KEYS[1], ticker, price)
  redis.call('RPUSH', KEYS[k], price)
  redis.call('LTRIM', KEYS[k], -cap, -1)
  k = k + 1
end
return redis.call('INCR', KEYS[2])
