-- Helpers of the json layout: one RedisJSON document per session at KEYS[1].
--
-- Paths are always JSONPath ('$...'): the answer is a JSON array of the
-- matches, e.g. '[{"AAPL":100}]', or nil when the key does not exist.  Writes
-- go to sub-paths only: a sub-path JSON.SET keeps the key's TTL, a root one
-- ('$') would replace the value and drop it.

-- The single value at path, decoded; nil when the key does not exist.
local function json_value(key, path)
  local raw = redis.call('JSON.GET', key, path)
  if not raw then
    return nil
  end
  return cjson.decode(raw)[1]
end

-- The whole document as JSON text, passed through without decoding.
local function json_document(key)
  local raw = redis.call('JSON.GET', key, '$')
  return string.sub(raw, 2, -2)
end

local function json_set(key, path, text)
  redis.call('JSON.SET', key, path, text)
end

-- The analysis_id of the document's current_analysis (nil when none).
local function json_current_analysis_id(current)
  if type(current) ~= 'table' then
    return nil
  end
  return current.analysis_id
end


-- The array at path, decoded ({} when the key or path does not exist).  A real
-- RedisJSON answers '[[...]]' (the matches, one array); the fakeredis emulator
-- drops the outer level for an array of objects, so both shapes are read.
local function json_array(key, path)
  local raw = redis.call('JSON.GET', key, path)
  if not raw then
    return {}
  end
  local matches = cjson.decode(raw)
  local first = matches[1]
  if type(first) == 'table' and (first[1] ~= nil or next(first) == nil) then
    return first
  end
  if first == nil then
    return {}
  end
  return matches
end
