-- Take or renew market leadership.
-- KEYS[1]  leader key;  ARGV[1] holder id;  ARGV[2] lease in milliseconds.
-- Returns 1 if ARGV[1] leads for the next lease, else 0.
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
