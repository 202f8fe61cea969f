-- Bring tickers new to the market in (claimed, as market_claim.lua does),
-- unless another process already did, and never past the cap of the universe.
-- KEYS[1] prices hash (ticker -> latest price)
-- KEYS[2] tick counter
-- KEYS[3] held cutoff (see trim_holders in market_lib.lua)
-- KEYS[4..] each new ticker's history ring, in the order of the triplets
-- ARGV[1] the most tickers the market may price
-- ARGV[2] the claiming session ('' = none: a repair, market_data.py)
-- ARGV[3] the holders key prefix
-- ARGV[4..] ticker, packed bootstrapped history (oldest first, ending with
--           the initial price), initial price, ... (triplets)
-- Returns {'ok', ticker, price, ticker, price, ...} with the price now stored
-- (ours, or the one another process stored first), or {'ticker_limit',
-- tickers priced now} when the new ones would not fit: nothing written.
-- The history is stored as a ring (see market_data.py): rotated so that its
-- last price sits at slot (current tick) mod length, where the tick that
-- priced it would have written it.
local new = 0
for i = 4, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    new = new + 1
  end
end
local size = redis.call('HLEN', KEYS[1])
if size + new > tonumber(ARGV[1]) then
  return {'ticker_limit', tostring(size)}
end
local now = now_ms()
local cutoff = redis.call('GET', KEYS[3])
local tick = current_tick(KEYS[2])
local out = {'ok'}
for i = 4, #ARGV, 3 do
  local ticker = ARGV[i]
  local current = redis.call('HGET', KEYS[1], ticker)
  if not current then
    redis.call('SET', KEYS[4 + (i - 4) / 3], history_to_ring(ARGV[i + 1], tick))
    redis.call('HSET', KEYS[1], ticker, ARGV[i + 2])
    current = ARGV[i + 2]
  end
  if ARGV[2] ~= '' then
    add_holder(ARGV[3], ticker, ARGV[2], now, cutoff)
  end
  out[#out + 1] = ticker
  out[#out + 1] = current
end
return out
