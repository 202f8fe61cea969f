-- create_if_missing, json layout: create the document unless it exists;
-- either way this is client activity.
-- KEYS[1] session document
-- ARGV[1] session id  ARGV[2] holdings JSON  ARGV[3] prices JSON
-- ARGV[4] now  ARGV[5] TTL seconds
-- ARGV[6] when the market claimed the tickers (Redis ms, '' = no claim)
-- ARGV[7] the claim's grace in ms
-- Returns {'created' | 'existing', document JSON}, or {'claim_expired'} (a
-- creation whose claim is older than its grace: nothing written).
local key, now = KEYS[1], ARGV[4]
local holdings = decode_numbers(ARGV[2])
local prices = held_prices(holdings, decode_numbers(ARGV[3]))
local document = '{"session_id":' .. cjson.encode(ARGV[1])
  .. ',"holdings":' .. encode_numbers(holdings)
  .. ',"prices":' .. encode_numbers(prices)
  .. ',"total_value":' .. num(total_value(holdings, prices))
  .. ',"portfolio_version":1,"current_analysis":null,"analysis_results":[]'
  .. ',"last_activity":' .. cjson.encode(now)
  .. ',"created_at":' .. cjson.encode(now)
  .. ((ARGV[6] or '') ~= '' and (',"claimed_at":' .. ARGV[6]) or '') .. '}'  -- see claim_superseded
local status = 'created'
if redis.call('EXISTS', key) == 0 and claim_expired(ARGV[6], ARGV[7]) then
  return {'claim_expired'}
end
if not redis.call('JSON.SET', key, '$', document, 'NX') then
  status = 'existing'
  json_set(key, '$.last_activity', cjson.encode(now))
end
redis.call('EXPIRE', key, ARGV[5])
return {status, json_document(key)}
