-- revalue, json layout: the market update of one session.  Reads only the
-- holdings, prices, total and version paths; writes (and bumps the version,
-- and publishes) only if the total or a held price changed.  Never activity:
-- neither last_activity nor the TTL is touched.
-- KEYS[1] session document
-- ARGV[1] events channel  ARGV[2] market prices JSON  ARGV[3] as_of
-- Returns {'missing'} or {'changed' | 'unchanged', version, total_value}.
local key = KEYS[1]
local holdings = json_value(key, '$.holdings')
if holdings == nil then
  return {'missing'}
end
local stored = json_value(key, '$.prices')
local old_total = json_value(key, '$.total_value')
local version = json_value(key, '$.portfolio_version')
local prices, changed = revalued_prices(holdings, stored, decode_numbers(ARGV[2]))
local total = total_value(holdings, prices)
if not changed and total == old_total then
  return {'unchanged', int(version), num(total)}
end
version = version + 1
json_set(key, '$.prices', encode_numbers(prices))
json_set(key, '$.total_value', num(total))
json_set(key, '$.portfolio_version', int(version))
-- For trio_portfolio/staleness.py: the first supersession since the snapshot, and when.
if type(json_value(key, '$.superseded_at')) ~= 'number' then
  json_set(key, '$.superseded_at', redis_time_ms())
end
json_set(key, '$.as_of', cjson.encode(ARGV[3]))
publish_portfolio(ARGV[1], version, total, prices, ARGV[3], 'market')
return {'changed', int(version), num(total)}
