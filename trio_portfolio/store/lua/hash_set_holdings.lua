-- set_holdings, hash layout: replace holdings and prices, recompute the
-- total, bump the version (so running analyses' appends fail 'stale'),
-- record activity and publish a portfolio event.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] events channel  ARGV[2] holdings JSON  ARGV[3] prices JSON
-- ARGV[4] now  ARGV[5] TTL seconds
-- ARGV[6] when the market claimed the tickers (Redis ms, '' = no claim)
-- ARGV[7] the claim's grace in ms
-- Returns {'replaced', document JSON}, {'missing'}, or {'claim_expired'}
-- (the claim is older than its grace: nothing written).
local now = ARGV[4]
local version = redis.call('HGET', KEYS[1], 'portfolio_version')
if not version then
  return {'missing'}
end
if claim_expired(ARGV[6], ARGV[7]) then
  return {'claim_expired'}
end
local holdings = decode_numbers(ARGV[2])
local prices = held_prices(holdings, decode_numbers(ARGV[3]))
local total = total_value(holdings, prices)
version = tonumber(version) + 1
hash_replace_numbers(KEYS[2], holdings)
hash_replace_numbers(KEYS[3], prices)
redis.call('HSET', KEYS[1],
  'total_value', num(total),
  'portfolio_version', int(version),
  'last_activity', now)
redis.call('HINCRBY', KEYS[1], 'holdings_version', 1)  -- trio_portfolio/staleness.py
refresh_ttl(ARGV[5])
publish_portfolio(ARGV[1], version, total, prices, now, 'holdings')
return {'replaced', hash_document()}
