-- create_if_missing, hash layout: create the session unless it exists;
-- either way this is client activity.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] session id  ARGV[2] holdings JSON  ARGV[3] prices JSON
-- ARGV[4] now  ARGV[5] TTL seconds
-- ARGV[6] when the market claimed the tickers (Redis ms, '' = no claim)
-- ARGV[7] the claim's grace in ms
-- Returns {'created' | 'existing', document JSON}, or {'claim_expired'} (a
-- creation whose claim is older than its grace: nothing written).
-- valued_tick, as_of and superseded_at are absent until the first revaluation.
local now = ARGV[4]
local status = 'existing'
if redis.call('EXISTS', KEYS[1]) == 0 then
  if claim_expired(ARGV[6], ARGV[7]) then
    return {'claim_expired'}
  end
  status = 'created'
  -- Keys of an expired session can outlive its hash by a millisecond; never reuse them.
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  local holdings = decode_numbers(ARGV[2])
  local prices = held_prices(holdings, decode_numbers(ARGV[3]))
  hash_update_numbers(KEYS[2], holdings)
  hash_update_numbers(KEYS[3], prices)
  redis.call('HSET', KEYS[1],
    'session_id', ARGV[1],
    'total_value', num(total_value(holdings, prices)),
    'portfolio_version', '1',
    'last_activity', now,
    'created_at', now)
  if (ARGV[6] or '') ~= '' then
    redis.call('HSET', KEYS[1], 'claimed_at', ARGV[6])  -- see claim_superseded
  end
else
  redis.call('HSET', KEYS[1], 'last_activity', now)
end
refresh_ttl(ARGV[5])
return {status, hash_document()}
