-- Renew a taker's leases on buckets of a pass it is still walking (after
-- each page), so a lease can be short: a taker that dies or stalls loses
-- its buckets within one lease, however long the bucket.
-- KEYS[1] work hash
-- ARGV[1] taker id  ARGV[2] lease in ms  ARGV[3] the pass's tick
-- ARGV[4..] the buckets
-- Returns 1 if every bucket is still the taker's (each lease renewed), else
-- 0 (the pass is over or a lease ran out and the bucket was taken again:
-- nothing renewed; the taker stops, what it did is fenced).
if tonumber(redis.call('HGET', KEYS[1], 'tick') or '-1') ~= tonumber(ARGV[3]) then
  return 0
end
local prefix = ARGV[1] .. ':'
for i = 4, #ARGV do
  local state = redis.call('HGET', KEYS[1], 'b' .. ARGV[i])
  if not state or string.sub(state, 1, #prefix) ~= prefix then
    return 0
  end
end
local expiry = now_ms() + tonumber(ARGV[2])
for i = 4, #ARGV do
  redis.call('HSET', KEYS[1], 'b' .. ARGV[i], prefix .. expiry)
end
return 1
