-- append_result, json layout: THE FENCE.  Append one result only while its
-- analysis is current and the result is fresh (the staleness rule of
-- trio_portfolio/staleness.py, fence_verdict in store_lib.lua); idempotent per
-- result id.  Not client activity: the TTL is left alone.
-- KEYS[1] session document
-- ARGV[1] analysis id  ARGV[2] portfolio version of the result's snapshot
-- ARGV[3] result JSON  ARGV[4] results limit  ARGV[5] trim slack
-- ARGV[6] holdings version of the snapshot  ARGV[7] max staleness (ms)
-- ARGV[8] result id  ARGV[9] '1' when re-asking after an unknown outcome
-- ARGV[10] most result ids recorded per analysis
-- Returns {'stored'}, {'already_stored'}, {'superseded'}, {'stale'} or {'missing'}.
--
-- JSON.ARRAPPEND is O(1); the array is trimmed back to the newest `limit`
-- only once it exceeds limit + slack, so trimming costs O(1) amortised and
-- readers keep only the newest `limit`.
local key = KEYS[1]
local raw = redis.call('JSON.GET', key, '$.current_analysis', '$.portfolio_version',
  '$.holdings_version', '$.superseded_at', '$.result_ids')
if not raw then
  return {'missing'}
end
local doc = cjson.decode(raw)
local version = doc['$.portfolio_version'][1]
if type(version) ~= 'number' then
  return {'missing'}
end
local ids = doc['$.result_ids'][1]
if type(ids) ~= 'string' then
  ids = nil
end
if ids_contain(ids, ARGV[8]) then
  return {'already_stored'}
end
if json_current_analysis_id(doc['$.current_analysis'][1]) ~= ARGV[1] then
  -- Another start cleared the ids: on a re-ask, look for the result itself.
  if ARGV[9] == '1' and results_hold(json_array(key, '$.analysis_results'), ARGV[8]) then
    return {'already_stored'}
  end
  return {'superseded'}
end
local holdings_version = doc['$.holdings_version'][1]
local superseded_at = doc['$.superseded_at'][1]
if type(superseded_at) ~= 'number' then
  superseded_at = nil
end
local verdict = fence_verdict(holdings_version, ARGV[6], version, ARGV[2], superseded_at,
  ARGV[7])
if verdict then
  return {verdict}
end
local length = redis.call('JSON.ARRAPPEND', key, '$.analysis_results', ARGV[3])[1]
local limit = tonumber(ARGV[4])
if length > limit + tonumber(ARGV[5]) then
  redis.call('JSON.ARRTRIM', key, '$.analysis_results', length - limit, length - 1)
end
json_set(key, '$.result_ids', cjson.encode(ids_add(ids, ARGV[8], ARGV[10])))
return {'stored'}
