-- The market as of now, in one round trip: the tick, its time and every price.
-- KEYS[1] prices hash  KEYS[2] tick counter  KEYS[3] tick time (as_of of the tick)
-- Returns {tick, as_of or '', ticker, price, ticker, price, ...}.
local out = {tostring(current_tick(KEYS[2])), redis.call('GET', KEYS[3]) or ''}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat do
  out[#out + 1] = flat[i]
end
return out
