-- start_analysis, hash layout: take the snapshot and make this analysis the
-- session's current one (the fence every later append checks), atomically.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] events channel  ARGV[2] analysis id  ARGV[3] ticker
-- ARGV[4] now  ARGV[5] TTL seconds
-- Returns {'missing'}, {'not_held'} (still activity) or {'started', snapshot JSON}.
local now = ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
redis.call('HSET', KEYS[1], 'last_activity', now)
refresh_ttl(ARGV[5])
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  return {'not_held'}
end
local holdings, prices = hash_numbers(KEYS[2]), hash_numbers(KEYS[3])
local state = redis.call('HMGET', KEYS[1], 'total_value', 'portfolio_version')
local total, version = tonumber(state[1]), tonumber(state[2])
local current = current_analysis_text(ARGV[2], ARGV[3], version, now)
redis.call('HSET', KEYS[1], 'current_analysis', current)
publish_analysis_started(ARGV[1], current)
return {'started', snapshot_text(holdings, prices, total, version)}
