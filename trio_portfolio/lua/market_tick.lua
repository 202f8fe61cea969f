-- Store one tick of prices, fenced on the tick counter.
-- KEYS[1]  prices hash;  KEYS[2]  tick counter;  KEYS[3]  history hash
-- ARGV[1]  the tick number the caller read (fence)
-- ARGV[2]  history cap in hex characters (ticks x 16)
-- ARGV[3..] ticker, price, packed price (16 hex chars), ... (triplets)
-- Returns the new tick number, or nil if another process advanced first.
-- Histories are strings, appended to and trimmed from the front here, so a
-- reader fetches one string per ticker instead of hundreds of list items.
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= tonumber(ARGV[1]) then return nil end
local cap = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local ticker = ARGV[i]
  redis.call('HSET', KEYS[1], ticker, ARGV[i + 1])
  local packed = (redis.call('HGET', KEYS[3], ticker) or '') .. ARGV[i + 2]
  if #packed > cap then packed = string.sub(packed, #packed - cap + 1) end
  redis.call('HSET', KEYS[3], ticker, packed)
end
return redis.call('INCR', KEYS[2])
