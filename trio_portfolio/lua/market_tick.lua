-- Store one tick of prices, fenced on the tick counter and on the leader,
-- and open the tick's work record (which buckets of the index are revalued).
-- KEYS[1] prices hash  KEYS[2] tick counter  KEYS[3] history hash
-- KEYS[4] leader key  KEYS[5] tick time  KEYS[6] work hash  KEYS[7] seen set
-- ARGV[1] the tick number the caller read (fence)
-- ARGV[2] the caller's leader id ('' = not checked: tools and tests)
-- ARGV[3] history cap in hex characters (ticks x 16)
-- ARGV[4] as_of of the new tick
-- ARGV[5..] ticker, price, packed price (16 hex chars), ... (triplets)
-- Returns {new tick number, walk start in Redis ms}, or nil if another
-- process advanced first or the caller no longer leads (nothing written).
-- Histories are strings, appended to and trimmed from the front here, so a
-- reader fetches one string per ticker instead of hundreds of list items.
-- A ticker pruned since the caller read the prices is not brought back.
if current_tick(KEYS[2]) ~= tonumber(ARGV[1]) then return nil end
if ARGV[2] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[2] then return nil end
local cap = tonumber(ARGV[3])
for i = 5, #ARGV, 3 do
  local ticker = ARGV[i]
  local packed = redis.call('HGET', KEYS[3], ticker)
  if packed then
    redis.call('HSET', KEYS[1], ticker, ARGV[i + 1])
    packed = packed .. ARGV[i + 2]
    if #packed > cap then packed = string.sub(packed, #packed - cap + 1) end
    redis.call('HSET', KEYS[3], ticker, packed)
  end
end
local tick = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[5], ARGV[4])
local start = now_ms()
redis.call('DEL', KEYS[6], KEYS[7])
redis.call('HSET', KEYS[6], 'tick', tick, 'start', start, 'done', 0)
return {tick, tostring(start)}
