-- append_result, hash layout: THE FENCE.  Append one result only while its
-- analysis is current and the portfolio version is the one it was computed
-- from.  Not client activity: the TTL is left alone.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] analysis id  ARGV[2] portfolio version of the result
-- ARGV[3] result JSON  ARGV[4] results limit  ARGV[5] trim slack (unused:
-- LTRIM after RPUSH drops one element per append, O(1) already)
-- Returns {'stored'}, {'superseded'}, {'stale'} or {'missing'}.
local state = redis.call('HMGET', KEYS[1], 'current_analysis', 'portfolio_version')
if not state[2] then
  return {'missing'}
end
if hash_current_analysis_id(state[1]) ~= ARGV[1] then
  return {'superseded'}
end
if tonumber(state[2]) ~= tonumber(ARGV[2]) then
  return {'stale'}
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
return {'stored'}
