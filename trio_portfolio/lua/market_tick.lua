-- Store one tick of prices, fenced on the tick counter and on the leader,
-- and open a revaluation pass for the new tick if one is due (none, or the
-- current one complete: see open_pass_if_due in market_lib.lua).  A pass
-- still running is left alone: the tick never waits for a walk, and the
-- walkers pick the new prices up (market_pass.lua opens the next pass when
-- this one completes).
-- KEYS[1] prices hash  KEYS[2] tick counter  KEYS[3] (unused: the history
-- hash of earlier versions)  KEYS[4] leader key  KEYS[5] tick time
-- KEYS[6] work hash  KEYS[7] seen set
-- KEYS[8..] each ticker's history ring, in the order of the triplets
-- ARGV[1] the tick number the caller read (fence)
-- ARGV[2] the caller's leader id ('' = not checked: tools and tests)
-- ARGV[3] history cap in hex characters (ticks x 16)
-- ARGV[4] as_of of the new tick  ARGV[5] number of index buckets
-- ARGV[6..] ticker, price, packed price (16 hex chars), ... (triplets)
-- Returns {new tick number, 1 if it opened a pass else 0}, or nil if
-- another process advanced first or the caller no longer leads (nothing
-- written).
-- A history is a ring (see market_data.py): tick t's price is at slot
-- t mod length, so a tick overwrites one 16-character slot per ticker
-- (SETRANGE) instead of copying the whole history through Lua.  A ring of
-- another length than the cap (the cap was changed) is rewritten whole,
-- one price longer or trimmed to the cap, until it has the cap's length.
-- A ticker pruned since the caller read the prices (no ring) is not
-- brought back.
if current_tick(KEYS[2]) ~= tonumber(ARGV[1]) then return nil end
if ARGV[2] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[2] then return nil end
local tick = tonumber(ARGV[1]) + 1
local cap = tonumber(ARGV[3])
local fields = {}
for i = 6, #ARGV, 3 do
  local ring = KEYS[8 + (i - 6) / 3]
  local size = redis.call('STRLEN', ring)
  if size >= 16 then
    fields[#fields + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i + 1]
    if size == cap then
      redis.call('SETRANGE', ring, (tick % (size / 16)) * 16, ARGV[i + 2])
    else
      local history = ring_to_history(redis.call('GET', ring), tick - 1) .. ARGV[i + 2]
      if #history > cap then history = string.sub(history, #history - cap + 1) end
      redis.call('SET', ring, history_to_ring(history, tick))
    end
  end
end
for i = 1, #fields, 1000 do
  redis.call('HSET', KEYS[1], unpack(fields, i, math.min(i + 999, #fields)))
end
tick = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[5], ARGV[4])
local opened = open_pass_if_due(KEYS[6], KEYS[7], tick, tonumber(ARGV[5]))
return {tick, opened and 1 or 0}
