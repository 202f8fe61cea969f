-- revalue, hash layout: the market update of one session, fenced by tick.
-- Writes (and bumps the version, and publishes) only if the total or a held
-- price changed.  Never activity: HSET on existing hashes keeps their TTL,
-- and neither last_activity nor any TTL is touched.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- ARGV[1] events channel  ARGV[2] as_of  ARGV[3] market tick ('' = unfenced)
-- ARGV[4..] ticker, price text, ... : a price for every held ticker, '' to
--           keep the stored one (a ticker that entered the market after the tick)
-- Returns {'missing'}, {'fenced', version, total} (already valued at this
-- tick or later: nothing written), {'need', ticker, ...} (a held ticker has
-- no price in ARGV, the holdings changed since the caller read them:
-- nothing written), or {'changed' | 'unchanged', version, total_value}.
local state = redis.call('HMGET', KEYS[1], 'total_value', 'portfolio_version', 'valued_tick',
  'superseded_at')
if not state[2] then
  return {'missing'}
end
local tick = tonumber(ARGV[3])
if tick and tonumber(state[3] or '-1') >= tick then
  return {'fenced', state[2], state[1]}
end
local given = {}
for i = 4, #ARGV, 2 do
  given[ARGV[i]] = ARGV[i + 1]
end
local holdings = hash_numbers(KEYS[2])
local stored = hash_numbers(KEYS[3])
local prices, moved, need = {}, {}, {}
for ticker in pairs(holdings) do
  local text = given[ticker]
  if text == nil then
    need[#need + 1] = ticker
  elseif text == '' then
    prices[ticker] = stored[ticker]
  else
    local price = tonumber(text)
    prices[ticker] = price
    if price ~= stored[ticker] then
      moved[#moved + 1] = ticker
      moved[#moved + 1] = text
    end
  end
end
if #need > 0 then
  return {'need', unpack(need)}
end
local total = total_value(holdings, prices)
local old_total, version = tonumber(state[1]), tonumber(state[2])
if #moved == 0 and total == old_total then
  if tick then
    redis.call('HSET', KEYS[1], 'valued_tick', ARGV[3], 'as_of', ARGV[2])
  end
  return {'unchanged', state[2], state[1]}
end
version = version + 1
if #moved > 0 then
  redis.call('HSET', KEYS[3], unpack(moved))
end
local total_text = num(total)
redis.call('HSET', KEYS[1], 'total_value', total_text, 'portfolio_version', int(version),
  'as_of', ARGV[2])
if tick then
  redis.call('HSET', KEYS[1], 'valued_tick', ARGV[3])
end
if not state[4] or state[4] == '' then
  redis.call('HSET', KEYS[1], 'superseded_at', redis_time_ms())
end
publish_portfolio(ARGV[1], version, total, prices, ARGV[2], 'market')
return {'changed', int(version), total_text}
