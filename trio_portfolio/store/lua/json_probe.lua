-- Layout detection: can scripts use RedisJSON here?  Writes, reads back and
-- deletes a scratch document in one atomic step, so nothing is left behind.
-- Fails with an error reply where JSON.* does not exist.
-- KEYS[1] scratch key  ARGV[1] a JSON document
-- Returns the JSON.GET answer for '$'.
redis.call('JSON.SET', KEYS[1], '$', ARGV[1])
local answer = redis.call('JSON.GET', KEYS[1], '$')
redis.call('DEL', KEYS[1])
return answer
