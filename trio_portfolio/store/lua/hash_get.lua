-- get, hash layout: the whole session, read atomically (a pipeline of reads
-- of four keys would not be).  Not activity.
-- KEYS[1] session hash  KEYS[2] holdings  KEYS[3] prices  KEYS[4] results
-- Returns {'found', document JSON} or {'missing'}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
return {'found', hash_document()}
