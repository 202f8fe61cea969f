-- touch, json layout: client activity (last_activity and TTL).
-- KEYS[1] session document
-- ARGV[1] now  ARGV[2] TTL seconds
-- Returns {'touched'} or {'missing'}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
json_set(KEYS[1], '$.last_activity', cjson.encode(ARGV[1]))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'touched'}
