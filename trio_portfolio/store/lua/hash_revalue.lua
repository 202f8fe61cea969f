-- revalue, hash layout: the market update of one session.  Writes (and
-- bumps the version, and publishes) only if the total or a held price
-- changed.  Never activity: HSET on existing hashes keeps their TTL, and
-- neither last_activity nor any TTL is touched.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] events channel  ARGV[2] market prices JSON  ARGV[3] as_of
-- Returns {'missing'} or {'changed' | 'unchanged', version, total_value}.
local state = redis.call('HMGET', KEYS[1], 'total_value', 'portfolio_version')
if not state[2] then
  return {'missing'}
end
local old_total, version = tonumber(state[1]), tonumber(state[2])
local holdings = hash_numbers(KEYS[2])
local stored = hash_numbers(KEYS[3])
local prices, changed = revalued_prices(holdings, stored, decode_numbers(ARGV[2]))
local total = total_value(holdings, prices)
if not changed and total == old_total then
  return {'unchanged', int(version), num(total)}
end
version = version + 1
hash_update_numbers(KEYS[3], prices)
redis.call('HSET', KEYS[1], 'total_value', num(total), 'portfolio_version', int(version))
-- For trio_portfolio/staleness.py: the first supersession since the snapshot, and when.
if redis.call('HEXISTS', KEYS[1], 'superseded_at') == 0 then
  redis.call('HSET', KEYS[1], 'superseded_at', redis_time_ms())
end
redis.call('HSET', KEYS[1], 'as_of', ARGV[3])
publish_portfolio(ARGV[1], version, total, prices, ARGV[3], 'market')
return {'changed', int(version), num(total)}
