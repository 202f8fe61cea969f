-- append_result, json layout: THE FENCE.  Append one result only while its
-- analysis is current and the portfolio version is the one it was computed
-- from.  Not client activity: the TTL is left alone.
-- KEYS[1] session document
-- ARGV[1] analysis id  ARGV[2] portfolio version of the result
-- ARGV[3] result JSON  ARGV[4] results limit  ARGV[5] trim slack
-- Returns {'stored'}, {'superseded'}, {'stale'} or {'missing'}.
--
-- JSON.ARRAPPEND is O(1); the array is trimmed back to the newest `limit`
-- only once it exceeds limit + slack, so trimming costs O(1) amortised and
-- readers keep only the newest `limit`.
local key = KEYS[1]
local current = json_value(key, '$.current_analysis')
if current == nil then
  return {'missing'}
end
if json_current_analysis_id(current) ~= ARGV[1] then
  return {'superseded'}
end
if json_value(key, '$.portfolio_version') ~= tonumber(ARGV[2]) then
  return {'stale'}
end
local length = redis.call('JSON.ARRAPPEND', key, '$.analysis_results', ARGV[3])[1]
local limit = tonumber(ARGV[4])
if length > limit + tonumber(ARGV[5]) then
  redis.call('JSON.ARRTRIM', key, '$.analysis_results', length - limit, length - 1)
end
return {'stored'}
