-- touch, hash layout: client activity (last_activity and TTL on every key).
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] now  ARGV[2] TTL seconds
-- Returns {'touched'} or {'missing'}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
redis.call('HSET', KEYS[1], 'last_activity', ARGV[1])
refresh_ttl(ARGV[2])
return {'touched'}
