-- set_holdings, hash layout: replace holdings and prices, recompute the
-- total, bump the version (so running analyses' appends fail 'stale'),
-- record activity and publish a portfolio event.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] events channel  ARGV[2] holdings JSON  ARGV[3] prices JSON
-- ARGV[4] now  ARGV[5] TTL seconds
-- ARGV[6] when the market claimed the tickers (Redis ms, '' = no claim)
-- ARGV[7] the claim's grace in ms
-- Returns {'replaced', document JSON, ticker let go, ...} (the tickers the
-- session held before and no longer holds), {'missing'}, or {'claim_expired'}
-- (the claim is older than its grace, or older than the claim of the
-- session's last write: nothing written).  The claim is stored (claimed_at).
local now = ARGV[4]
local version = redis.call('HGET', KEYS[1], 'portfolio_version')
if not version then
  return {'missing'}
end
if claim_expired(ARGV[6], ARGV[7])
    or claim_superseded(redis.call('HGET', KEYS[1], 'claimed_at'), ARGV[6], ARGV[7]) then
  return {'claim_expired'}
end
local before = redis.call('HKEYS', KEYS[2])
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
if (ARGV[6] or '') ~= '' then
  redis.call('HSET', KEYS[1], 'claimed_at', ARGV[6])
end
redis.call('HINCRBY', KEYS[1], 'holdings_version', 1)  -- trio_portfolio/staleness.py
refresh_ttl(ARGV[5])
publish_portfolio(ARGV[1], version, total, prices, now, 'holdings')
local out = {'replaced', hash_document()}
for _, ticker in ipairs(before) do
  if holdings[ticker] == nil then
    out[#out + 1] = ticker
  end
end
return out
