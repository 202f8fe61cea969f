-- Open the next revaluation pass if it is due (see open_pass_if_due in
-- market_lib.lua: no pass, or the current one complete and older than the
-- current tick), and answer where the current pass stands.  Any process
-- may call it; the check and the opening are one step, so two callers
-- cannot both open a pass.
-- KEYS[1] work hash  KEYS[2] tick counter  KEYS[3] seen set
-- ARGV[1] number of buckets
-- Returns {pass tick or -1 (no pass), buckets done, current tick, 1 if this
-- call opened the pass else 0}.
local tick = current_tick(KEYS[2])
local opened = open_pass_if_due(KEYS[1], KEYS[3], tick, tonumber(ARGV[1]))
local state = redis.call('HMGET', KEYS[1], 'tick', 'done')
return {tonumber(state[1] or '-1'), tonumber(state[2] or '0'), tick, opened and 1 or 0}
