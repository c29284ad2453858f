-- list.lua: a page of one partition's live tracks in one state, newest update first,
-- once the fold has reached the entry the reader needs. Prepended with ids.lua (Id),
-- packed.lua (P) and index.lua (Ix).
--
-- KEYS[1]  the partition's stream {prefix:p}:log
-- KEYS[2]  its meta hash {prefix:p}:meta (geo, pos: see get.lua)
-- KEYS[3]  its fence {prefix:p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  job key prefix of generation 0   {prefix:p}:b:
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
-- The index (index.lua: pages of JIDs by updated_at, kept by snapshot.lua Snap.write) is
-- a hint: each entry is checked against its snapshot in its bucket (same state, not
-- expired, queue), so an entry a sweep has not removed yet is never listed.

local now = Id.now_ms()
local m = redis.call('HMGET', KEYS[2], 'geo', 'pos')
local need = ARGV[2]
if need == '' then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  need = newest[1] and newest[1][1] or '0-0'
end
local fmt = string.format
if need ~= '0-0' and (not m[2] or Id.lt(m[2], need)) then return {fmt('%d', now), need} end

local g = P.geometry(m[1] or nil)
local tag = string.sub(ARGV[1], 1, -4)
local gs = g.gen == 0 and '' or fmt('%d', g.gen)
local bpre, vpre = tag .. ':b' .. gs .. ':', tag .. ':v' .. gs .. ':' -- Snap.store
local idx = tag .. ':s' .. gs .. ':' .. ARGV[3] -- Snap.store's idx

-- The job's snapshot (nil: none) from its bucket or overflow string.
local function snapshot(jid)
  local v
  if #jid <= P.CAP then
    v = redis.call('HGET', bpre .. P.addr(P.hash(jid), g), jid)
    if v == P.STUB then v = redis.call('GET', vpre .. jid) end
  else
    v = redis.call('GET', vpre .. jid)
  end
  if not v then return nil end
  local ok, t = pcall(P.decode, v)
  return ok and t or nil
end
local state, queue, limit = ARGV[3], ARGV[4], tonumber(ARGV[5])
local cursor_ms, cursor_jid, budget = ARGV[6], ARGV[7], tonumber(ARGV[8])
local max = cursor_ms == '' and '+inf' or cursor_ms
local out = {fmt('%d', now), '', 0, cursor_ms, cursor_jid}
local found, seen = 0, 0
local pages = Ix.pages(idx, max)
for key in pages do
  local page = redis.call('ZREVRANGEBYSCORE', key, max, '-inf', 'WITHSCORES')
  for i = 1, #page, 2 do
    local jid, score = page[i], page[i + 1]
    if not (score == cursor_ms and jid >= cursor_jid) then -- past the cursor
      seen = seen + 1
      local t = snapshot(jid)
      if t and t.s == state and t.x > now and (queue == '' or t.q == queue) then
        out[#out + 1] = jid
        out[#out + 1] = {t.s, t.p and fmt('%d', t.p) or false, t.d or false, fmt('%d', t.u),
                         t.r > 0 and fmt('%d', t.r) or false, fmt('%d', t.x)}
        found = found + 1
      end
      out[4], out[5] = score, jid
      if found >= limit or seen >= budget then return out end
    end
  end
end
out[3] = 1
return out
