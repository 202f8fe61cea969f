-- start_analysis, hash layout: take the snapshot and make this analysis the
-- session's current one (the fence every later append checks), atomically.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] events channel  ARGV[2] analysis id  ARGV[3] ticker
-- ARGV[4] now  ARGV[5] TTL seconds
-- ARGV[6] expected current analysis id: '' for a client's analyze (activity);
--         an automatic restart's predecessor otherwise (not activity), and the
--         restart is refused {'switched'} unless that one is still current.
-- Returns {'missing'}, {'switched'}, {'not_held'} (activity when requested)
-- or {'started', snapshot JSON}.  Clears superseded_at and the stored result
-- ids: they belong to the snapshot now current (trio_portfolio/staleness.py).
local now, expected = ARGV[4], ARGV[6]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
if expected ~= '' then
  local current = redis.call('HGET', KEYS[1], 'current_analysis')
  if hash_current_analysis_id(current or nil) ~= expected then
    return {'switched'}
  end
else
  redis.call('HSET', KEYS[1], 'last_activity', now)
  refresh_ttl(ARGV[5])
end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  return {'not_held'}
end
local holdings, prices = hash_numbers(KEYS[2]), hash_numbers(KEYS[3])
local state = redis.call('HMGET', KEYS[1], 'total_value', 'portfolio_version',
  'holdings_version', 'as_of', 'created_at')
local total, version = tonumber(state[1]), tonumber(state[2])
local holdings_version = tonumber(state[3] or '0')
local as_of = state[4] or state[5]
local current = current_analysis_text(ARGV[2], ARGV[3], version, now)
redis.call('HSET', KEYS[1], 'current_analysis', current)
redis.call('HDEL', KEYS[1], 'superseded_at', 'result_ids')
publish_analysis_started(ARGV[1], current)
return {'started', snapshot_text(holdings, prices, total, version, holdings_version, as_of)}
