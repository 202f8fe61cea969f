-- A session let tickers go (its write of holdings, claimed at ARGV[2], landed
-- without them): end its hold on each, and drop from the market at once every
-- one that nobody holds any more (see market_data.py, "Letting go").
-- A ticker is dropped when all of these hold:
--   * a pass has completed (the held cutoff exists): before that, holds of
--     sessions written earlier are not known;
--   * it is not in the held set (the tickers the last complete pass's walk
--     found held; a session written before that pass began is known only by
--     it, and the next pass prunes the ticker if it is let go);
--   * no session holds a claim of it since the held cutoff: every write that
--     landed after the last complete pass began, or is in flight, claimed
--     its tickers then; a claim ends only by its own session's let-go of a
--     later write (writes of one session land in the order of their claims,
--     see claim_superseded in store/lua/store_lib.lua).
-- KEYS[1] prices hash  KEYS[2] claims hash  KEYS[3] held set  KEYS[4] held cutoff
-- ARGV[1] the session  ARGV[2] its write's claim (Redis ms)
-- ARGV[3] the holders key prefix  ARGV[4] the history rings' key prefix
--         (both with the {market} hash tag of KEYS)
-- ARGV[5..] the tickers let go
-- Returns the tickers dropped.
local cutoff = redis.call('GET', KEYS[4])
local claim = tonumber(ARGV[2])
local dropped = {}
for i = 5, #ARGV do
  local ticker = ARGV[i]
  local holders = ARGV[3] .. ticker
  local since = redis.call('ZSCORE', holders, ARGV[1])
  -- An equal claim may be another write's in the same ms: kept (the pass prunes).
  if since and tonumber(since) < claim then
    redis.call('ZREM', holders, ARGV[1])
  end
  trim_holders(holders, cutoff)
  if cutoff and redis.call('ZCARD', holders) == 0
      and redis.call('SISMEMBER', KEYS[3], ticker) == 0
      and redis.call('HDEL', KEYS[1], ticker) == 1 then
    redis.call('DEL', ARGV[4] .. ticker)
    redis.call('HDEL', KEYS[2], ticker)
    dropped[#dropped + 1] = ticker
  end
end
return dropped
