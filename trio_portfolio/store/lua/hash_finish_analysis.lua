-- finish_analysis, hash layout: clear current_analysis if it is still this
-- analysis (fenced, so a late finish cannot clear a newer analysis).
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] analysis id
-- Returns {'finished'}, {'not_current'} or {'missing'}.
local state = redis.call('HMGET', KEYS[1], 'current_analysis', 'portfolio_version')
if not state[2] then
  return {'missing'}
end
if hash_current_analysis_id(state[1]) ~= ARGV[1] then
  return {'not_current'}
end
redis.call('HDEL', KEYS[1], 'current_analysis')
return {'finished'}
