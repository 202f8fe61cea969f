-- Move histories from the hash earlier versions kept into rings (once).
-- KEYS[1] the old history hash (ticker -> packed history, oldest first,
--         its newest price the current tick's)
-- KEYS[2] tick counter  KEYS[3..] the rings of ARGV's tickers, in order
-- ARGV    tickers
-- Returns how many histories moved (a ticker that has a ring keeps it; its
-- old entry is dropped either way).
local tick = current_tick(KEYS[2])
local moved = 0
for i = 1, #ARGV do
  local packed = redis.call('HGET', KEYS[1], ARGV[i])
  if packed and redis.call('EXISTS', KEYS[2 + i]) == 0 then
    if #packed >= 16 then
      redis.call('SET', KEYS[2 + i], history_to_ring(packed, tick))
      moved = moved + 1
    end
  end
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return moved
