-- Helpers shared by the market_*.lua scripts (prepended to each when loaded).

-- Redis's clock in milliseconds (one clock for every script of one server).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The tick counter as a number (0 before the first tick).
local function current_tick(key)
  return tonumber(redis.call('GET', key) or '0')
end

-- History rings (see market_data.py): the price of tick t sits at slot
-- t mod length (16 hex characters a slot), so the newest is the current
-- tick's.  These two convert between a ring and the history oldest first.
local function ring_to_history(ring, tick)
  local length = math.floor(#ring / 16)
  if length == 0 then return '' end
  local cut = ((tick + 1) % length) * 16
  return string.sub(ring, cut + 1, length * 16) .. string.sub(ring, 1, cut)
end

local function history_to_ring(history, tick)
  local length = math.floor(#history / 16)
  if length == 0 then return '' end
  local cut = ((length - (tick + 1) % length) % length) * 16
  return string.sub(history, cut + 1, length * 16) .. string.sub(history, 1, cut)
end

-- The revaluation pass (work hash: tick, start, done, n buckets, b<N>,
-- pruned): open one for `tick` when it is due, that is when there is none,
-- or the current one has every bucket done and is of an older tick.  An
-- incomplete pass is never replaced: it is left to finish (with the
-- freshest prices of whoever walks it).  `buckets` is the number of index
-- buckets, or nil to use the current pass's own `n` (the tick script, which
-- then opens nothing while there is no pass: market_pass.lua opens the
-- first one).  Returns true if a pass was opened.
local function open_pass_if_due(work, seen, tick, buckets)
  if tick <= 0 then return false end
  local state = redis.call('HMGET', work, 'tick', 'done', 'n')
  local n = buckets or tonumber(state[3] or '')
  if n == nil then return false end
  if state[1] and (tonumber(state[2] or '0') < n or tonumber(state[1]) >= tick) then
    return false
  end
  redis.call('DEL', work, seen)
  redis.call('HSET', work, 'tick', tick, 'start', now_ms(), 'done', 0, 'n', n)
  return true
end

-- Holders (see market_data.py, "Letting go"): <prefix>:holders:<ticker> is a
-- sorted set, session id -> Redis ms of its last claim of the ticker.  An
-- entry older than the held cutoff (the start of the last complete pass
-- minus the claim grace and the clock skew allowance; nil before the first)
-- is trimmed: its write landed before that pass's walk, which saw the ticker
-- if the session still held it.
local function trim_holders(key, cutoff)
  if cutoff then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
  end
end

-- Record that `holder` claimed `ticker` at `now` (ms) for a write of holdings.
local function add_holder(prefix, ticker, holder, now, cutoff)
  local key = prefix .. ticker
  trim_holders(key, cutoff)
  redis.call('ZADD', key, now, holder)
end

-- Take `ticker` out of the market: its price and its history ring (the
-- caller has made sure no live session holds it).  True if it was priced.
local function drop_ticker(prices, ring_prefix, ticker)
  if redis.call('HDEL', prices, ticker) == 0 then
    return false
  end
  redis.call('DEL', ring_prefix .. ticker)
  return true
end
