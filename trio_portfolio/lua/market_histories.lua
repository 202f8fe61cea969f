-- Read history rings with the tick they are aligned to, in one round trip.
-- KEYS[1] tick counter  KEYS[2..] history rings
-- Returns {tick, ring or false, ...} in the order of KEYS[2..].
local out = {tostring(current_tick(KEYS[1]))}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[i])
end
return out
