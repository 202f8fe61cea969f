-- set_holdings, json layout: replace holdings and prices, recompute the
-- total, bump the version (so running analyses' appends fail 'stale'),
-- record activity and publish a portfolio event.
-- KEYS[1] session document
-- ARGV[1] events channel  ARGV[2] holdings JSON  ARGV[3] prices JSON
-- ARGV[4] now  ARGV[5] TTL seconds
-- ARGV[6] when the market claimed the tickers (Redis ms, '' = no claim)
-- ARGV[7] the claim's grace in ms
-- Returns {'replaced', document JSON, ticker let go, ...} (the tickers the
-- session held before and no longer holds), {'missing'}, or {'claim_expired'}
-- (the claim is older than its grace, or older than the claim of the
-- session's last write: nothing written).  The claim is stored (claimed_at).
local key, now = KEYS[1], ARGV[4]
local version = json_value(key, '$.portfolio_version')
if version == nil then
  return {'missing'}
end
local stored_claim = json_value(key, '$.claimed_at')
if claim_expired(ARGV[6], ARGV[7]) or claim_superseded(stored_claim, ARGV[6], ARGV[7]) then
  return {'claim_expired'}
end
local before = json_value(key, '$.holdings') or {}
local holdings = decode_numbers(ARGV[2])
local prices = held_prices(holdings, decode_numbers(ARGV[3]))
local total = total_value(holdings, prices)
version = version + 1
json_set(key, '$.holdings', encode_numbers(holdings))
json_set(key, '$.prices', encode_numbers(prices))
json_set(key, '$.total_value', num(total))
json_set(key, '$.portfolio_version', int(version))
json_set(key, '$.last_activity', cjson.encode(now))
if (ARGV[6] or '') ~= '' then
  json_set(key, '$.claimed_at', ARGV[6])
end
-- holdings_version: trio_portfolio/staleness.py
json_set(key, '$.holdings_version', int((json_value(key, '$.holdings_version') or 0) + 1))
redis.call('EXPIRE', key, ARGV[5])
publish_portfolio(ARGV[1], version, total, prices, now, 'holdings')
local out = {'replaced', json_document(key)}
for _, ticker in ipairs(sorted_keys(before)) do
  if holdings[ticker] == nil then
    out[#out + 1] = ticker
  end
end
return out
