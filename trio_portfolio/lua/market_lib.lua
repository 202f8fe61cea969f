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
