-- finish_analysis, json layout: clear current_analysis if it is still this
-- analysis (fenced, so a late finish cannot clear a newer analysis).
-- KEYS[1] session document
-- ARGV[1] analysis id
-- Returns {'finished'}, {'not_current'} or {'missing'}.
local current = json_value(KEYS[1], '$.current_analysis')
if current == nil then
  return {'missing'}
end
if json_current_analysis_id(current) ~= ARGV[1] then
  return {'not_current'}
end
json_set(KEYS[1], '$.current_analysis', 'null')
return {'finished'}
