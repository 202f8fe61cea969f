-- A session let tickers go (its write of holdings, claimed at ARGV[2], landed
-- without them): end its claims of them, and drop from the market at once
-- each one nobody holds any more (see market_data.py, "Letting go"), which is
-- when all of these are true:
--   * a pass has completed (the held cutoff exists): before that, what the
--     sessions written earlier hold is not known;
--   * it is not in the held set (the tickers the last complete pass's walk
--     found held: a session written before that pass began is known only
--     there, so such a ticker waits for the next prune);
--   * no session has a claim of it since the held cutoff (trim_holders in
--     market_lib.lua): every write that landed after the last complete pass
--     began, or is in flight, claimed its tickers after the cutoff, and a
--     claim ends only by a let-go of its own session for a write claimed
--     later (a session's writes land in the order of their claims, see
--     claim_superseded in store/lua/store_lib.lua).  An equal claim may be
--     another write's in the same millisecond: it is kept (the prune decides).
-- A ticker dropped is also taken out of the running pass's seen set: a
-- session the walk saw holding it has let it go since (nobody holds it), and
-- left there, the pass's end would take it for held and unpriced (Repair).
-- KEYS[1] prices hash  KEYS[2] held set  KEYS[3] held cutoff  KEYS[4] seen set
-- ARGV[1] the session  ARGV[2] its write's claim (Redis ms)
-- ARGV[3] the holders key prefix  ARGV[4] the history rings' key prefix
--         (both with the {market} hash tag of KEYS)
-- ARGV[5..] the tickers let go
-- Returns the tickers dropped.
local cutoff = redis.call('GET', KEYS[3])
local claim = tonumber(ARGV[2])
local dropped = {}
for i = 5, #ARGV do
  local ticker = ARGV[i]
  local holders = ARGV[3] .. ticker
  local since = redis.call('ZSCORE', holders, ARGV[1])
  if since and tonumber(since) < claim then
    redis.call('ZREM', holders, ARGV[1])
  end
  trim_holders(holders, cutoff)
  if cutoff and redis.call('EXISTS', holders) == 0
      and redis.call('SISMEMBER', KEYS[2], ticker) == 0
      and drop_ticker(KEYS[1], ARGV[4], ticker) then
    redis.call('SREM', KEYS[4], ticker)
    dropped[#dropped + 1] = ticker
  end
end
return dropped
