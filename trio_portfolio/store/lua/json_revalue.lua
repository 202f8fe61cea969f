-- revalue, json layout: the market update of one session, fenced by tick.
-- Reads only the paths it needs, in one JSON.GET; writes (and bumps the
-- version, and publishes) only if the total or a held price changed.
-- Never activity: neither last_activity nor the TTL is touched.
-- KEYS[1] session document (the events channel is KEYS[1] .. ':events')
-- ARGV[1] as_of  ARGV[2] market tick ('' = unfenced)
-- ARGV[3] 'TICKER=price;TICKER=price...': a price for every held ticker,
--         empty to keep the stored one (a ticker newer than the tick)
-- Returns {'missing'}, {'fenced', version, total}, {'need', ticker, ...} or
-- {'changed' | 'unchanged', version, total_value}, as hash_revalue.lua.
local key = KEYS[1]
local raw = redis.call('JSON.GET', key, '$.holdings', '$.prices', '$.total_value',
  '$.portfolio_version', '$.valued_tick', '$.superseded_at')
if not raw then
  return {'missing'}
end
local doc = cjson.decode(raw)
local holdings = doc['$.holdings'][1]
if type(holdings) ~= 'table' then
  return {'missing'}
end
local stored = doc['$.prices'][1]
local old_total, version = doc['$.total_value'][1], doc['$.portfolio_version'][1]
local valued_tick, superseded = doc['$.valued_tick'][1], doc['$.superseded_at'][1]
local tick = tonumber(ARGV[2])
if tick and type(valued_tick) == 'number' and valued_tick >= tick then
  return {'fenced', int(version), num(old_total)}
end
local given = {}
for ticker, text in string.gmatch(ARGV[3], '([^=;]+)=([^;]*)') do
  given[ticker] = text
end
local prices, changed, need = {}, false, {}
for ticker in pairs(holdings) do
  local text = given[ticker]
  if text == nil then
    need[#need + 1] = ticker
  elseif text == '' then
    prices[ticker] = stored[ticker]
  else
    prices[ticker] = tonumber(text)
    if prices[ticker] ~= stored[ticker] then
      changed = true
    end
  end
end
if #need > 0 then
  return {'need', unpack(need)}
end
local total = total_value(holdings, prices)
if not changed and total == old_total then
  if tick then
    json_set(key, '$.valued_tick', ARGV[2])
    json_set(key, '$.as_of', cjson.encode(ARGV[1]))
  end
  return {'unchanged', int(version), num(total)}
end
version = version + 1
json_set(key, '$.prices', encode_numbers(prices))
json_set(key, '$.total_value', num(total))
json_set(key, '$.portfolio_version', int(version))
json_set(key, '$.as_of', cjson.encode(ARGV[1]))
if tick then
  json_set(key, '$.valued_tick', ARGV[2])
end
if type(superseded) ~= 'number' then
  json_set(key, '$.superseded_at', redis_time_ms())
end
publish_portfolio(key .. ':events', version, total, prices, ARGV[1], 'market')
return {'changed', int(version), num(total)}
