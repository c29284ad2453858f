-- history.lua: one job's entries, from the history index in its stored value. Prepended
-- with ids.lua (Id) and packed.lua (P).
--
-- KEYS[1]  the partition's stream {p}:log     KEYS[2]  its meta hash {p}:meta
-- KEYS[3]  the partition's fence {p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  job key prefix of generation 0 {p}:b:     ARGV[2]  the JID
-- Returns {first entry ID of the stream or '', {IDs missing from the log},
--          {id, fields} ...}, oldest first. An entry is missing once retention trimmed
-- it; the index outlives it by design: it is visible until retention after the job's
-- newest entry (then it answers as none, whether or not the sweep has removed it).
-- One XRANGE per entry (O(log N) each), so the cost follows the job, not the log.

local m = redis.call('HMGET', KEYS[2], 'geo', 'retention')
local g = P.geometry(m[1] or nil)
local retention = tonumber(m[2]) or 7 * 86400000 -- Snap.DEFAULT_RETENTION
local tag, jid = string.sub(ARGV[1], 1, -4), ARGV[2]
local gs = g.gen == 0 and '' or string.format('%d', g.gen)
local vkey = tag .. ':v' .. gs .. ':' .. jid -- Snap.store
local v
if #jid <= P.CAP then
  v = redis.call('HGET', tag .. ':b' .. gs .. ':' .. P.addr(P.hash(jid), g), jid)
  if v == P.STUB then v = redis.call('GET', vkey) end
else
  v = redis.call('GET', vkey)
end
local ids = {}
if v then
  local ok, got = pcall(P.entries, v)
  if ok and #got > 0 and got[1][1] + retention > Id.now_ms() then ids = got end
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local missing = {}
local out = {first[1] and first[1][1] or '', missing}
for i = #ids, 1, -1 do
  local id = string.format('%d-%d', ids[i][1], ids[i][2])
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 1 then out[#out + 1] = found[1] else missing[#missing + 1] = id end
end
return out
