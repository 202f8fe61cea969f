-- Take up to ARGV[4] buckets of the revaluation pass of tick ARGV[5]: ones
-- nobody took, or whose taker's lease ran out (a dead or stalled process).
-- The pass is named by its own tick, not the current one: the market may
-- have ticked since the pass opened, and the pass goes on (its buckets are
-- revalued with the freshest prices, labelled with their own tick).
-- KEYS[1] work hash  KEYS[2] tick counter
-- ARGV[1] taker id  ARGV[2] lease in ms  ARGV[3] number of buckets
-- ARGV[4] most buckets to take  ARGV[5] the pass's tick
-- Returns {pass tick, current tick, bucket, ...}: no bucket when every one
-- is done or taken, or when the current pass is not ARGV[5]'s (pass tick
-- -1: there is no pass).
local pass = tonumber(redis.call('HGET', KEYS[1], 'tick') or '-1')
local out = {pass, current_tick(KEYS[2])}
if pass < 0 or pass ~= tonumber(ARGV[5]) then
  return out
end
local now = now_ms()
local most = tonumber(ARGV[4])
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
    if #out >= most + 2 then
      break
    end
  end
end
return out
