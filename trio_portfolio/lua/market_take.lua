-- Take up to ARGV[4] buckets of the current tick's revaluation: ones nobody
-- took, or whose taker's lease ran out (a dead or stalled process).
-- KEYS[1] work hash  KEYS[2] tick counter
-- ARGV[1] taker id  ARGV[2] lease in ms  ARGV[3] number of buckets
-- ARGV[4] most buckets to take
-- Returns {tick, bucket, ...}, {tick} when every bucket is done or taken,
-- or {-1} when there is no work record for the current tick.
local tick = current_tick(KEYS[2])
if tonumber(redis.call('HGET', KEYS[1], 'tick') or '-1') ~= tick then
  return {-1}
end
local now = now_ms()
local out, most = {tick}, tonumber(ARGV[4])
for b = 0, tonumber(ARGV[3]) - 1 do
  local field = 'b' .. b
  local state = redis.call('HGET', KEYS[1], field)
  local free = not state
  if state and state ~= 'done' then
    local expiry = tonumber(string.match(state, ':(%d+)$'))
    free = expiry == nil or expiry < now
  end
  if free then
    redis.call('HSET', KEYS[1], field, ARGV[1] .. ':' .. (now + tonumber(ARGV[2])))
    out[#out + 1] = b
    if #out > most then
      break
    end
  end
end
return out
