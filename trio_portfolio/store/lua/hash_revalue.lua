-- revalue, hash layout: the market update of one session, fenced by tick.
-- Writes (and bumps the version, and publishes) only if the total or a held
-- price changed.  Never activity: HSET on existing hashes keeps their TTL,
-- and neither last_activity nor any TTL is touched.  The hottest script of
-- the project (every session, every tick): it formats no number it was
-- given (price texts are stored and published as received) and writes each
-- hash once.  Only store_lib.lua is prepended (not store_lib_hash.lua).
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices
--         (the events channel is KEYS[1] .. ':events', see SessionKeys.events)
-- ARGV[1] as_of  ARGV[2] market tick ('' = unfenced)
-- ARGV[3] 'TICKER=price;TICKER=price...': a price for every held ticker,
--         empty to keep the stored one (a ticker newer than the tick)
-- Returns {'missing'}, {'fenced', version, total} (already valued at this
-- tick or later: nothing written), {'need', ticker, ...} (a held ticker has
-- no price in ARGV: the holdings changed since the caller read them;
-- nothing written), or {'changed' | 'unchanged', version, total_value}.
local state = redis.call('HMGET', KEYS[1], 'total_value', 'portfolio_version', 'valued_tick',
  'superseded_at')
if not state[2] then
  return {'missing'}
end
local tick = tonumber(ARGV[2])
if tick and tonumber(state[3] or '-1') >= tick then
  return {'fenced', state[2], state[1]}
end
local given = {}
for ticker, text in string.gmatch(ARGV[3], '([^=;]+)=([^;]*)') do
  given[ticker] = text
end
local flat = redis.call('HGETALL', KEYS[3])
local stored = {}
for i = 1, #flat, 2 do
  stored[flat[i]] = flat[i + 1]
end
flat = redis.call('HGETALL', KEYS[2])
local tickers, quantity = {}, {}
for i = 1, #flat, 2 do
  tickers[#tickers + 1] = flat[i]
  quantity[flat[i]] = tonumber(flat[i + 1])
end
table.sort(tickers)
local need, moved, parts, total = {}, {}, {}, 0
for _, ticker in ipairs(tickers) do
  local text = given[ticker]
  if text == nil then
    need[#need + 1] = ticker
  else
    if text == '' then
      text = stored[ticker]
    end
    local price = tonumber(text)
    if not price then
      error('no price for held ticker ' .. ticker)
    end
    if price ~= tonumber(stored[ticker]) then
      moved[#moved + 1] = ticker
      moved[#moved + 1] = text
    end
    total = total + quantity[ticker] * price
    if string.find(ticker, '[%c"\\]') then
      parts[#parts + 1] = cjson.encode(ticker) .. ':' .. text
    else
      parts[#parts + 1] = '"' .. ticker .. '":' .. text
    end
  end
end
if #need > 0 then
  return {'need', unpack(need)}
end
if #moved == 0 and total == tonumber(state[1]) then
  if tick then
    redis.call('HSET', KEYS[1], 'valued_tick', ARGV[2], 'as_of', ARGV[1])
  end
  return {'unchanged', state[2], state[1]}
end
local version = int(tonumber(state[2]) + 1)
local total_text = num(total)
if #moved > 0 then
  redis.call('HSET', KEYS[3], unpack(moved))
end
local fields = {'total_value', total_text, 'portfolio_version', version, 'as_of', ARGV[1]}
if tick then
  fields[#fields + 1] = 'valued_tick'
  fields[#fields + 1] = ARGV[2]
end
if not state[4] or state[4] == '' then
  fields[#fields + 1] = 'superseded_at'
  fields[#fields + 1] = redis_time_ms()
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call(PUBLISH_COMMAND, KEYS[1] .. ':events', '{"kind":"portfolio","portfolio_version":' .. version
  .. ',"total_value":' .. total_text
  .. ',"prices":{' .. table.concat(parts, ',') .. '}'
  .. ',"as_of":' .. cjson.encode(ARGV[1]) .. ',"cause":"market"}')
return {'changed', version, total_text}
