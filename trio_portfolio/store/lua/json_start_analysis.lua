-- start_analysis, json layout: take the snapshot and make this analysis the
-- session's current one (the fence every later append checks), atomically.
-- KEYS[1] session document
-- ARGV[1] events channel  ARGV[2] analysis id  ARGV[3] ticker
-- ARGV[4] now  ARGV[5] TTL seconds
-- ARGV[6] expected current analysis id: '' for a client's analyze (activity);
--         an automatic restart's predecessor otherwise (not activity), and the
--         restart is refused {'switched'} unless that one is still current.
-- Returns {'missing'}, {'switched'}, {'not_held'} (activity when requested)
-- or {'started', snapshot JSON}.  Clears $.superseded_at and $.result_ids:
-- they belong to the snapshot now current (trio_portfolio/staleness.py).
local key, now, expected = KEYS[1], ARGV[4], ARGV[6]
local holdings = json_value(key, '$.holdings')
if holdings == nil then
  return {'missing'}
end
if expected ~= '' then
  if json_current_analysis_id(json_value(key, '$.current_analysis')) ~= expected then
    return {'switched'}
  end
else
  json_set(key, '$.last_activity', cjson.encode(now))
  redis.call('EXPIRE', key, ARGV[5])
end
if type(holdings[ARGV[3]]) ~= 'number' then
  return {'not_held'}
end
local prices = json_value(key, '$.prices')
local total = json_value(key, '$.total_value')
local version = json_value(key, '$.portfolio_version')
local holdings_version = json_value(key, '$.holdings_version') or 0
local as_of = json_value(key, '$.as_of')
if type(as_of) ~= 'string' then
  as_of = json_value(key, '$.created_at')
end
local current = current_analysis_text(ARGV[2], ARGV[3], version, now)
json_set(key, '$.current_analysis', current)
json_set(key, '$.superseded_at', 'null')
json_set(key, '$.result_ids', '""')
publish_analysis_started(ARGV[1], current)
return {'started', snapshot_text(holdings, prices, total, version, holdings_version, as_of)}
