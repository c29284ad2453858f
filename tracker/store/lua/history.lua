-- history.lua: one job's entries, from its per-job history index. Prepended with
-- tracker/store/lua/snapshot.lua (Snap.unpack_id).
--
-- KEYS[1]  the partition's stream {p}:log     KEYS[2]  the job's index {p}:h:<jid>
-- KEYS[3]  the partition's fence {p}:fence (never written; see tracker/store/keys.py)
-- Returns {first entry ID of the stream or '', {IDs missing from the log},
--          {id, fields} ...}. An entry is missing once retention trimmed it; the
-- index outlives it by design (it expires with the job's newest entry).
-- One XRANGE per entry (O(log N) each), so the cost follows the job, not the log.

local idx = redis.call('GET', KEYS[2]) or ''
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local missing = {}
local out = {first[1] and first[1][1] or '', missing}
for i = 1, #idx - 9, 10 do
  local id = Snap.unpack_id(idx, i)
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 1 then out[#out + 1] = found[1] else missing[#missing + 1] = id end
end
return out
