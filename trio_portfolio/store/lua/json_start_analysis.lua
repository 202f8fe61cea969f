-- start_analysis, json layout: take the snapshot and make this analysis the
-- session's current one (the fence every later append checks), atomically.
-- KEYS[1] session document
-- ARGV[1] events channel  ARGV[2] analysis id  ARGV[3] ticker
-- ARGV[4] now  ARGV[5] TTL seconds
-- Returns {'missing'}, {'not_held'} (still activity) or {'started', snapshot JSON}.
local key, now = KEYS[1], ARGV[4]
local holdings = json_value(key, '$.holdings')
if holdings == nil then
  return {'missing'}
end
json_set(key, '$.last_activity', cjson.encode(now))
redis.call('EXPIRE', key, ARGV[5])
if type(holdings[ARGV[3]]) ~= 'number' then
  return {'not_held'}
end
local prices = json_value(key, '$.prices')
local total = json_value(key, '$.total_value')
local version = json_value(key, '$.portfolio_version')
local current = current_analysis_text(ARGV[2], ARGV[3], version, now)
json_set(key, '$.current_analysis', current)
publish_analysis_started(ARGV[1], current)
return {'started', snapshot_text(holdings, prices, total, version)}
