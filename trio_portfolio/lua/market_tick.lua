-- Store one tick of prices, fenced on the tick counter and on the leader,
-- and open a revaluation pass for the new tick if one is due: the current
-- pass is complete (see open_pass_if_due in market_lib.lua).  A pass still
-- running is left alone: the tick never waits for a walk, the walkers pick
-- the new prices up, and market_pass.lua opens the next pass (and the first
-- one) as soon as it is due.  The "walk start" returned is the start of the
-- current pass ('' before the first).
-- KEYS[1] prices hash  KEYS[2] tick counter  KEYS[3] leader key
-- KEYS[4] tick time  KEYS[5] work hash  KEYS[6] seen set
-- ARGV[1] the tick number the caller read (fence)
-- ARGV[2] the caller's leader id ('' = not checked: tools and tests)
-- ARGV[3] history cap in hex characters (ticks x 16)
-- ARGV[4] as_of of the new tick
-- ARGV[5] the history rings' key prefix (ring of T = ARGV[5] .. T; same
--         {market} hash tag as KEYS, so in this script's slot on Cluster)
-- ARGV[6] tickers, comma-separated   ARGV[7] their prices, comma-separated
-- ARGV[8] their packed prices (16 hex characters each), concatenated
-- (Three strings, not three arguments per ticker: a tick of 1,000 tickers
-- would otherwise spend about 2 ms encoding and parsing 3,000 arguments.)
-- Returns {new tick number, walk start in Redis ms}, or nil if another
-- process advanced first or the caller no longer leads (nothing written).
-- A history is a ring (see market_data.py): tick t's price is at slot
-- t mod length, so a tick overwrites one 16-character slot per ticker
-- (SETRANGE) instead of copying the whole history through Lua.  A ring of
-- another length than the cap (the cap was changed) is rewritten whole,
-- one price longer or trimmed to the cap, until it has the cap's length.
-- A ticker pruned since the caller read the prices (no ring) is not
-- brought back.
if current_tick(KEYS[2]) ~= tonumber(ARGV[1]) then return nil end
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[2] then return nil end
local tick = tonumber(ARGV[1]) + 1
local cap = tonumber(ARGV[3])
local fields = {}
local prices = {}
for price in string.gmatch(ARGV[7], '[^,]+') do
  prices[#prices + 1] = price
end
local n = 0
for ticker in string.gmatch(ARGV[6], '[^,]+') do
  n = n + 1
  local ring = ARGV[5] .. ticker
  local size = redis.call('STRLEN', ring)
  if size >= 16 then
    local packed = string.sub(ARGV[8], n * 16 - 15, n * 16)
    fields[#fields + 1] = ticker
    fields[#fields + 1] = prices[n]
    if size == cap then
      redis.call('SETRANGE', ring, (tick % (size / 16)) * 16, packed)
    else
      local history = ring_to_history(redis.call('GET', ring), tick - 1) .. packed
      if #history > cap then history = string.sub(history, #history - cap + 1) end
      redis.call('SET', ring, history_to_ring(history, tick))
    end
  end
end
for i = 1, #fields, 1000 do
  redis.call('HSET', KEYS[1], unpack(fields, i, math.min(i + 999, #fields)))
end
tick = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[4], ARGV[4])
open_pass_if_due(KEYS[5], KEYS[6], tick, nil)
return {tick, redis.call('HGET', KEYS[5], 'start') or ''}
