-- Helpers of the hash layout.  KEYS[1] is the session hash (scalars; its
-- existence is the session's existence), KEYS[2] the holdings hash
-- (ticker -> quantity), KEYS[3] the prices hash (ticker -> price), KEYS[4]
-- the results list (JSON text per result, oldest first).  Numbers are stored
-- as num() text, so they read back exactly.

-- A hash of numbers as a Lua table.
local function hash_numbers(key)
  local flat = redis.call('HGETALL', key)
  local t = {}
  for i = 1, #flat, 2 do
    t[flat[i]] = tonumber(flat[i + 1])
  end
  return t
end

-- Overwrite (and add) fields; an existing hash keeps its TTL.
local function hash_update_numbers(key, t)
  local args = {}
  for _, k in ipairs(sorted_keys(t)) do
    args[#args + 1] = k
    args[#args + 1] = num(t[k])
  end
  if #args > 0 then
    redis.call('HSET', key, unpack(args))
  end
end

-- Replace the whole hash; the key is recreated, so the caller must set its TTL.
local function hash_replace_numbers(key, t)
  redis.call('DEL', key)
  hash_update_numbers(key, t)
end

-- Client activity: the full TTL on every key of the session, the session
-- hash first, so that no other key of the session expires before it.
local function refresh_ttl(ttl)
  for i = 1, #KEYS do
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end

-- The analysis_id in a stored current_analysis text (nil when none).
local function hash_current_analysis_id(text)
  if not text then
    return nil
  end
  return cjson.decode(text).analysis_id
end

-- The session as the json layout's document text (the shared reply format).
local function hash_document()
  local flat = redis.call('HGETALL', KEYS[1])
  local f = {}
  for i = 1, #flat, 2 do
    f[flat[i]] = flat[i + 1]
  end
  return '{"session_id":' .. cjson.encode(f.session_id)
    .. ',"holdings":' .. encode_numbers(hash_numbers(KEYS[2]))
    .. ',"prices":' .. encode_numbers(hash_numbers(KEYS[3]))
    .. ',"total_value":' .. num(tonumber(f.total_value))
    .. ',"portfolio_version":' .. int(tonumber(f.portfolio_version))
    .. ',"current_analysis":' .. (f.current_analysis or 'null')
    .. ',"analysis_results":[' .. table.concat(redis.call('LRANGE', KEYS[4], 0, -1), ',') .. ']'
    .. ',"last_activity":' .. cjson.encode(f.last_activity)
    .. ',"created_at":' .. cjson.encode(f.created_at) .. '}'
end

