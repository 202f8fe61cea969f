-- Mark buckets of a revaluation pass done, add the tickers their live
-- sessions hold to the pass's seen set and, when the last bucket is done,
-- prune the universe: every priced ticker that no session seen in this
-- pass's walk holds and that no session has claimed since ARGV[4] ms
-- before the pass began (no holder left after trim_holders, see
-- market_lib.lua) loses its price, history and holders.  (A holdings write
-- lands within the grace of its claim, so a write claimed earlier than that
-- landed before the walk began, and the walk saw it; a later claim ends only
-- by its session's let-go, market_let_go.lua.)  The pass's seen set then
-- becomes the held set, and its cutoff (start minus ARGV[4]) the held
-- cutoff, which market_let_go.lua and trim_holders rely on.
-- KEYS[1] work hash  KEYS[2] tick counter  KEYS[3] seen set  KEYS[4] prices
-- KEYS[5] held set  KEYS[6] held cutoff
-- ARGV[1] the pass's tick (not the current tick: the market may have
--         ticked since the pass opened, and the pass goes on)
-- ARGV[2] buckets done now, comma-separated
-- ARGV[3] number of buckets  ARGV[4] the claim grace plus the clock skew
--         allowance, ms (CLAIM_GRACE_MS + CLOCK_SKEW_MS)
-- ARGV[5] the history rings' key prefix (ring of T = ARGV[5] .. T) and
-- ARGV[6] the holders key prefix (holders of T = ARGV[6] .. T): the tickers
--         to drop are found here, so their keys cannot be declared; they
--         share the {market} hash tag of KEYS, so on Redis Cluster they are
--         in this script's slot
-- ARGV[7..] tickers held by those buckets' live sessions
-- Returns {'stale'} if the current pass is not ARGV[1]'s (it completed and
-- the next one opened: nothing written), else {'done', buckets done, pass
-- duration in ms, ticks the market is past the pass's tick, n, n tickers
-- pruned, then the tickers seen held that are not priced}; the call that
-- completed the pass (the one that also pruned) fills all that, the others
-- answer {'done', buckets done, '', ''}.
local tick = tonumber(ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'tick') or '-1') ~= tick then
  return {'stale'}
end
for i = 7, #ARGV, 1000 do
  redis.call('SADD', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local done = tonumber(redis.call('HGET', KEYS[1], 'done'))
for bucket in string.gmatch(ARGV[2], '%d+') do
  local field = 'b' .. bucket
  if redis.call('HGET', KEYS[1], field) ~= 'done' then
    redis.call('HSET', KEYS[1], field, 'done')
    done = redis.call('HINCRBY', KEYS[1], 'done', 1)
  end
end
if done < tonumber(ARGV[3]) or redis.call('HSETNX', KEYS[1], 'pruned', 1) == 0 then
  return {'done', tostring(done), '', ''}
end
local start = tonumber(redis.call('HGET', KEYS[1], 'start'))
local out = {'done', tostring(done), tostring(now_ms() - start), tostring(current_tick(KEYS[2]) - tick)}
local cutoff = tostring(start - tonumber(ARGV[4]))
local pruned = {}
for _, ticker in ipairs(redis.call('HKEYS', KEYS[4])) do
  local holders = ARGV[6] .. ticker
  trim_holders(holders, cutoff)
  if redis.call('SISMEMBER', KEYS[3], ticker) == 0 and redis.call('EXISTS', holders) == 0 then
    drop_ticker(KEYS[4], ARGV[5], ticker)
    pruned[#pruned + 1] = ticker
  end
end
out[#out + 1] = tostring(#pruned)
for _, ticker in ipairs(pruned) do
  out[#out + 1] = ticker
end
for _, ticker in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('HEXISTS', KEYS[4], ticker) == 0 then
    out[#out + 1] = ticker  -- seen held but not priced: see market_data.py, "Repair"
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('RENAME', KEYS[3], KEYS[5])
else
  redis.call('DEL', KEYS[5])
end
redis.call('SET', KEYS[6], cutoff)
return out
