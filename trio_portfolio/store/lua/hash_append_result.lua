-- append_result, hash layout: THE FENCE.  Append one result only while its
-- analysis is current and the result is fresh (the staleness rule of
-- trio_portfolio/staleness.py, fence_verdict in store_lib.lua); idempotent per
-- result id.  Not client activity: the TTL is left alone.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] analysis id  ARGV[2] portfolio version of the result's snapshot
-- ARGV[3] result JSON  ARGV[4] results limit  ARGV[5] trim slack (unused:
-- LTRIM after RPUSH drops one element per append, O(1) already)
-- ARGV[6] holdings version of the snapshot  ARGV[7] max staleness (ms)
-- ARGV[8] result id  ARGV[9] '1' when re-asking after an unknown outcome
-- ARGV[10] most result ids recorded per analysis
-- Returns {'stored'}, {'already_stored'}, {'superseded'}, {'stale'} or {'missing'}.
local state = redis.call('HMGET', KEYS[1], 'current_analysis', 'portfolio_version',
  'holdings_version', 'superseded_at', 'result_ids')
if not state[2] then
  return {'missing'}
end
if ids_contain(state[5] or nil, ARGV[8]) then
  return {'already_stored'}
end
if hash_current_analysis_id(state[1]) ~= ARGV[1] then
  -- Another start cleared the ids: on a re-ask, look for the result itself.
  if ARGV[9] == '1' and results_hold(redis.call('LRANGE', KEYS[4], 0, -1), ARGV[8]) then
    return {'already_stored'}
  end
  return {'superseded'}
end
local verdict = fence_verdict(state[3] or nil, ARGV[6], state[2], ARGV[2], state[4] or nil,
  ARGV[7])
if verdict then
  return {verdict}
end
local length = redis.call('RPUSH', KEYS[4], ARGV[3])
if length == 1 then
  -- A new list: give it the session's remaining lifetime (not a new one).
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
end
local limit = tonumber(ARGV[4])
if length > limit then
  redis.call('LTRIM', KEYS[4], -limit, -1)
end
redis.call('HSET', KEYS[1], 'result_ids', ids_add(state[5] or nil, ARGV[8], ARGV[10]))
return {'stored'}
