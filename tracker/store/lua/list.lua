-- list.lua: a page of one partition's live tracks in one state, newest update first,
-- once the fold has reached the entry the reader needs. Prepended with ids.lua (Id).
--
-- KEYS[1]  the partition's stream {prefix:p}:log
-- KEYS[2]  its meta hash {prefix:p}:meta (gen, pos: see get.lua)
-- KEYS[3]  its fence {prefix:p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  snapshot key prefix of generation 0   {prefix:p}:t:
-- ARGV[2]  the entry the fold must have reached ('' = the stream's newest; see get.lua)
-- ARGV[3]  the state
-- ARGV[4]  the queue, or '' for any
-- ARGV[5]  how many tracks to return at most
-- ARGV[6]  cursor: update time (ms) of the last track already listed, '' to start
-- ARGV[7]  cursor JID: with an equal time, only JIDs before it (index order) come next
-- ARGV[8]  how many index entries this call may examine (bounds its time)
-- Returns {now_ms, '', done, cursor ms, cursor JID, jid1, row1, jid2, row2, ...} with rows
-- {s, p, d, u, r, x}; done = 1 when the index holds nothing past the cursor; the cursor is
-- where examining stopped. Or {now_ms, need} when the fold is behind (as get.lua).
--
-- The index ({p}:s<gen>:<state>, score = updated_at, see snapshot.lua Snap.write) is a
-- hint: each entry is checked against its snapshot (same state, not expired, queue), so
-- an entry a sweep has not removed yet is never listed.

local now = Id.now_ms()
local m = redis.call('HMGET', KEYS[2], 'gen', 'pos')
local need = ARGV[2]
if need == '' then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  need = newest[1] and newest[1][1] or '0-0'
end
local fmt = string.format
if need ~= '0-0' and (not m[2] or Id.lt(m[2], need)) then return {fmt('%d', now), need} end

local snap, gen = ARGV[1], m[1]
if gen and gen ~= '0' then snap = string.sub(snap, 1, -2) .. gen .. ':' end -- Snap.prefix
local tag, g = string.match(snap, '^(.*):t(%d*):$')
local idx = tag .. ':s' .. g .. ':' .. ARGV[3] -- Snap.index
local state, queue, limit = ARGV[3], ARGV[4], tonumber(ARGV[5])
local cursor_ms, cursor_jid, budget = ARGV[6], ARGV[7], tonumber(ARGV[8])
local max = cursor_ms == '' and '+inf' or cursor_ms
local out = {fmt('%d', now), '', 0, cursor_ms, cursor_jid}
local found, seen, offset, chunk = 0, 0, 0, math.min(budget, math.max(limit * 2, 32))
while true do
  local page = redis.call('ZREVRANGEBYSCORE', idx, max, '-inf', 'WITHSCORES', 'LIMIT', offset, chunk)
  for i = 1, #page, 2 do
    local jid, score = page[i], page[i + 1]
    if not (score == cursor_ms and jid >= cursor_jid) then -- past the cursor
      seen = seen + 1
      local row = redis.call('HMGET', snap .. jid, 's', 'p', 'd', 'u', 'r', 'x', 'q')
      if row[1] == state and tonumber(row[6]) > now and (queue == '' or row[7] == queue) then
        row[7] = nil
        out[#out + 1] = jid
        out[#out + 1] = row
        found = found + 1
      end
      out[4], out[5] = score, jid
      if found >= limit or seen >= budget then return out end
    end
  end
  if #page < 2 * chunk then
    out[3] = 1
    return out
  end
  offset = offset + chunk
end
