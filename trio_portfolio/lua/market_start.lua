-- What a process does to the market's universe keys when it starts:
-- * the claims hash versions before holders kept (ticker -> Redis ms of its
--   last claim) becomes holder entries of LEGACY_HOLDER (ARGV[2]) with the same
--   times, so a pass that was running across the upgrade still keeps what
--   those claims covered; like any claim, the entries are trimmed once older
--   than a pass's cutoff;
-- * the held set and its cutoff are deleted, so letting go starts only after
--   a pass of this process's version has completed (they may be left from an
--   earlier run of this version, with an older version running in between,
--   whose writes no holders recorded).  Until then tickers let go wait for
--   the prune, as they would anyway.
-- KEYS[1] the old claims hash  KEYS[2] held set  KEYS[3] held cutoff
-- ARGV[1] the holders key prefix (holders of T = ARGV[1] .. T; same {market}
--         hash tag)  ARGV[2] the holder name of the old claims
-- Returns how many old claims became holder entries.
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  redis.call('ZADD', ARGV[1] .. flat[i], flat[i + 1], ARGV[2])
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return #flat / 2
