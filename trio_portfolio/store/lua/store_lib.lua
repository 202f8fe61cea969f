-- Helpers shared by every json_*.lua and hash_*.lua session script.
--
-- Not a script on its own: trio_portfolio.store prepends this file (and then
-- store_lib_json.lua or store_lib_hash.lua) to each session script when it
-- loads it, so both layouts compute and render numbers the same way.
--
-- Numbers.  cjson.encode keeps only 14 significant digits and Redis turns a
-- Lua number reply into an integer, so no double is ever handed to either:
-- num() renders the shortest decimal text that reads back as the same double,
-- and replies carry numbers as such text.  Totals are summed in byte order of
-- ticker (as Python's sorted() orders ASCII), so both layouts round alike.

local function num(x)
  if type(x) ~= 'number' or x ~= x or x == math.huge or x == -math.huge then
    error('not a finite number: ' .. tostring(x))
  end
  for precision = 15, 17 do
    local text = string.format('%.' .. precision .. 'g', x)
    if tonumber(text) == x then
      return text
    end
  end
  return string.format('%.17g', x)
end

local function int(x)
  return string.format('%d', x)
end

-- Redis's clock in milliseconds, as integer text (the clock every script of
-- one server shares; see claim_expired).
local function redis_time_ms()
  local t = redis.call('TIME')
  return int(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end

-- Whether a market claim made at ARGV claimed_at (ms, '' for none) is older
-- than grace ms: a write of holdings must land within the grace of the claim
-- of its tickers, or the market may already have pruned them
-- (trio_portfolio/market.py, "The universe").
local function claim_expired(claimed_at, grace)
  if claimed_at == nil or claimed_at == '' then
    return false
  end
  return tonumber(redis_time_ms()) > tonumber(claimed_at) + tonumber(grace)
end

-- Whether a write of holdings claimed at claimed_at (ms, '' for none) comes
-- after the session's last write claimed later (stored, nil for none):
-- writes of one session must land in the order of their claims, or the
-- market's let-go of the later one (market_let_go.lua) could drop a ticker
-- the earlier one, landing last, holds.  Two writes in flight together have
-- claims less than the grace plus the clocks' skew apart (each lands within
-- the grace of its claim); a gap wider than twice the grace is the clock
-- stepping back, and the write is let through rather than refused until the
-- clock catches up.
local function claim_superseded(stored, claimed_at, grace)
  -- stored: nil (JSON) or false (HGET) when the session has no claim yet
  if not stored or claimed_at == nil or claimed_at == '' then
    return false
  end
  local gap = tonumber(stored) - tonumber(claimed_at)
  return gap > 0 and gap <= 2 * tonumber(grace)
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  table.sort(keys)
  return keys
end

-- A JSON object of numbers (an ARGV payload) as a Lua table; rejects anything else.
local function decode_numbers(text)
  local t = cjson.decode(text)
  if type(t) ~= 'table' then
    error('expected a JSON object of numbers')
  end
  for k, v in pairs(t) do
    if type(k) ~= 'string' or type(v) ~= 'number' then
      error('expected a JSON object of numbers')
    end
  end
  return t
end

-- {ticker = number} as JSON object text, keys sorted, numbers exact.
local function encode_numbers(t)
  local parts = {}
  for _, k in ipairs(sorted_keys(t)) do
    parts[#parts + 1] = cjson.encode(k) .. ':' .. num(t[k])
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- The prices of the held tickers only; every held ticker must have one.
local function held_prices(holdings, prices)
  local held = {}
  for ticker in pairs(holdings) do
    local price = prices[ticker]
    if type(price) ~= 'number' then
      error('no price for held ticker ' .. ticker)
    end
    held[ticker] = price
  end
  return held
end

-- After a market update: the market's price where it has one, else the stored
-- one; and whether any held price changed.
local function revalued_prices(holdings, stored, market)
  local prices, changed = {}, false
  for ticker in pairs(holdings) do
    local price = market[ticker]
    if type(price) ~= 'number' then
      price = stored[ticker]
    end
    if type(price) ~= 'number' then
      error('no price for held ticker ' .. ticker)
    end
    if price ~= stored[ticker] then
      changed = true
    end
    prices[ticker] = price
  end
  return prices, changed
end

-- Sum of quantity x price over the holdings, in a fixed order.
local function total_value(holdings, prices)
  local total = 0
  for _, ticker in ipairs(sorted_keys(holdings)) do
    total = total + holdings[ticker] * prices[ticker]
  end
  return total
end

-- The current_analysis marker as JSON text (stored as-is by both layouts).
local function current_analysis_text(analysis_id, ticker, version, started_at)
  return '{"analysis_id":' .. cjson.encode(analysis_id)
    .. ',"ticker":' .. cjson.encode(ticker)
    .. ',"portfolio_version":' .. int(version)
    .. ',"started_at":' .. cjson.encode(started_at) .. '}'
end

-- What start_analysis answers: the part of the portfolio an analysis reads,
-- with the holdings version and the time of its prices (as_of).
local function snapshot_text(holdings, prices, total, version, holdings_version, as_of)
  return '{"holdings":' .. encode_numbers(holdings)
    .. ',"prices":' .. encode_numbers(prices)
    .. ',"total_value":' .. num(total)
    .. ',"portfolio_version":' .. int(version)
    .. ',"holdings_version":' .. int(holdings_version)
    .. ',"as_of":' .. cjson.encode(as_of) .. '}'
end

-- THE STALENESS RULE, as defined once in trio_portfolio/staleness.py (read it
-- there; trio_portfolio.staleness.is_fresh is the same rule in Python).  For
-- the current analysis: 'stale' if the holdings changed since the snapshot, or
-- the valuation changed and was first superseded (superseded_at, Redis ms)
-- more than max_ms ago (any change when max_ms is 0); nil when fresh.  An
-- unknown snapshot holdings version ('') is checked strictly: max_ms is 0 then.
local function fence_verdict(holdings_version, snap_holdings_version, version, snap_version,
                             superseded_at, max_ms)
  if snap_holdings_version ~= ''
      and tonumber(holdings_version or 0) ~= tonumber(snap_holdings_version) then
    return 'stale'
  end
  if tonumber(version) == tonumber(snap_version) then
    return nil
  end
  local since = tonumber(superseded_at)
  local bound = tonumber(max_ms)
  if bound <= 0 or since == nil then
    return 'stale'
  end
  if tonumber(redis_time_ms()) - since <= bound then
    return nil
  end
  return 'stale'
end

-- The ids of the results stored for the current analysis: ',id1,id2,' text
-- (ids hold no comma), cleared by start_analysis, at most `limit` ids.  An
-- empty id is no id (never recorded, never found).
local function ids_contain(text, id)
  return id ~= '' and text ~= nil and string.find(text, ',' .. id .. ',', 1, true) ~= nil
end

local function ids_add(text, id, limit)
  if id == '' then
    return text or ''
  end
  local ids = {}
  for existing in string.gmatch(text or '', '[^,]+') do
    ids[#ids + 1] = existing
  end
  ids[#ids + 1] = id
  local first = math.max(1, #ids - tonumber(limit) + 1)
  return ',' .. table.concat(ids, ',', first, #ids) .. ','
end

-- Whether any of the stored results (JSON texts or decoded tables) has the
-- result id `id`, newest first.
local function results_hold(results, id)
  if id == '' then
    return false
  end
  for i = #results, 1, -1 do
    local r = results[i]
    if type(r) == 'string' then
      r = cjson.decode(r)
    end
    if type(r) == 'table' and r.result_id == id then
      return true
    end
  end
  return false
end

-- Events (format in docs/adr/002-session-store-layouts.md).  PUBLISH_COMMAND
-- ('PUBLISH', or 'SPUBLISH' on a cluster) is defined by the line the store
-- puts before every script (SessionStore.__init__, store/base.py).
local function publish_portfolio(channel, version, total, prices, as_of, cause)
  redis.call(PUBLISH_COMMAND, channel, '{"kind":"portfolio","portfolio_version":' .. int(version)
    .. ',"total_value":' .. num(total)
    .. ',"prices":' .. encode_numbers(prices)
    .. ',"as_of":' .. cjson.encode(as_of)
    .. ',"cause":' .. cjson.encode(cause) .. '}')
end

local function publish_analysis_started(channel, current_text)
  redis.call(PUBLISH_COMMAND, channel, '{"kind":"analysis_started",' .. string.sub(current_text, 2))
end

