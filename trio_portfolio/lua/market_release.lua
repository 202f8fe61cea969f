-- End every lease a taker holds on buckets of a pass (a walker that was
-- cancelled: a shutdown, or the updater stopped), so the pass does not wait
-- a lease for them.  Every bucket, not a list: a take cancelled while its
-- answer was on the way took buckets the walker never heard of.
-- KEYS[1] work hash
-- ARGV[1] taker id  ARGV[2] the pass's tick  ARGV[3] number of buckets
-- Returns how many leases ended (0 if the current pass is another one).
if tonumber(redis.call('HGET', KEYS[1], 'tick') or '-1') ~= tonumber(ARGV[2]) then
  return 0
end
local prefix = ARGV[1] .. ':'
local ended = 0
for b = 0, tonumber(ARGV[3]) - 1 do
  local field = 'b' .. b
  local state = redis.call('HGET', KEYS[1], field)
  if state and string.sub(state, 1, #prefix) == prefix then
    redis.call('HSET', KEYS[1], field, prefix .. '0')
    ended = ended + 1
  end
end
return ended
