-- Bring tickers new to the market in, unless another process already did.
-- KEYS[1]      prices hash (ticker -> latest price)
-- KEYS[2..n]   history list of each ticker in ARGV[2], in the same order
-- ARGV[1]      history length cap
-- ARGV[2]      JSON object: ticker -> bootstrapped history (oldest first,
--              ending at the ticker's initial price)
-- Returns a JSON object: ticker -> the price now stored (ours or theirs).
local cap = tonumber(ARGV[1])
local histories = cjson.decode(ARGV[2])
local tickers = {}
for ticker in pairs(histories) do tickers[#tickers + 1] = ticker end
table.sort(tickers)
local out = {}
for i, ticker in ipairs(tickers) do
  local current = redis.call('HGET', KEYS[1], ticker)
  if current then
    out[ticker] = tonumber(current)
  else
    local series = histories[ticker]
    local key = KEYS[i + 1]
    redis.call('DEL', key)
    local first = math.max(1, #series - cap + 1)
    for j = first, #series, 500 do
      redis.call('RPUSH', key, unpack(series, j, math.min(j + 499, #series)))
    end
    local last = series[#series]
    redis.call('HSET', KEYS[1], ticker, string.format('%.17g', last))
    out[ticker] = last
  end
end
return cjson.encode(out)
