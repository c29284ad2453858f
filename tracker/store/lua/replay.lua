-- replay.lua: rebuild a partition's stored jobs (snapshots and history indexes, and the
-- state index) from its log into a new generation, while the live projector keeps going.
-- Prepended with projections/track.lua (Fold), ids.lua, packed.lua (P), index.lua (Ix)
-- and snapshot.lua (Snap), so a rebuild folds and stores exactly as project.lua does. Driven by
-- tracker/replay.py.
--
-- KEYS[1] stream {p}:log   KEYS[2] meta {p}:meta   KEYS[3] state {p}:replay
-- KEYS[4] held {p}:replay:held   KEYS[5] partial {p}:replay:partial
-- KEYS[6] fence {p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1] mode: begin | chunk | switch | read
-- ARGV[2] job key prefix of generation 0 {p}:b:    ARGV[3] consumer group
-- ARGV[4] entries per chunk   ARGV[5] ttl ms   ARGV[6] grace ms
-- ARGV[7] hold ms: a track that would expire for good (x + grace) within this is kept
--         until the switch (its log position may still be before its expiry), which
--         must come within hold ms of the begin
-- ARGV[8] lock ms (the state hash's TTL, refreshed by every chunk)
-- ARGV[9] new generation (chunk, switch)
-- ARGV[10] check-from ID: a JID whose history index starts before it lost its
--          beginning to trimming; '' when the log was never trimmed
-- ARGV[11..19] the fold's limits (tracker.store.scripts.LIMITS)
-- ARGV[20..] JIDs (read)
--
-- Why it cannot answer wrong: a chunk folds only entries the live projector has
-- already applied (up to the group's last-delivered ID, before any pending entry),
-- into keys nobody reads. The switch folds the rest up to that same point and
-- flips {p}:meta geo (generation and geometry) in one script, so project.lua and
-- get.lua (which read it in their own atomic steps) go from the old generation to an
-- equal new one at once. The new generation's geometry and field count live in the
-- state hash until then; its buckets are sized at the begin from the live field count.

local stream, meta, state, held, partial = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode, base, group = ARGV[1], ARGV[2], ARGV[3]
local count, ttl, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local hold, lock = tonumber(ARGV[7]), tonumber(ARGV[8])
local fmt = string.format

local live = Snap.live(base) -- the live generation (the old one, until the switch)
live.grace = grace
local now = live.now
local id_lt = Snap.id_lt

-- The end of what the live projector has applied: {XRANGE end, group exists}.
-- Pending entries (a foreign reader's) are delivered but not applied: stop before them.
local function live_end()
  if redis.call('EXISTS', stream) == 0 then return nil, false end
  local groups = redis.call('XINFO', 'GROUPS', stream)
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == group then
      local p = redis.call('XPENDING', stream, group)
      if p[1] > 0 then return '(' .. p[2], true end
      return last, true
    end
  end
  -- No projector has run yet: the rebuild folds everything and creates the group after it.
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  return newest[1] and newest[1][1] or nil, false
end

local function first_id()
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  return first[1] and first[1][1] or ''
end

if mode == 'begin' then
  if redis.call('EXISTS', state) == 1 then
    return redis.error_reply('BUSY a rebuild of this partition is already running')
  end
  -- (A deployment of the layout before buckets has 'gen' and no 'geo'; 'geo' alone names
  -- the live generation since.)
  local m = redis.call('HMGET', meta, 'geo', 'gen')
  local cur = m[1] and live.g.gen or tonumber(m[2] or '0') or 0
  local g = {gen = cur + 1, b0 = math.max(P.B0, math.ceil(live.n / P.ALPHA)), bl = 0, bs = 0}
  redis.call('HSET', state, 'gen', cur + 1, 'old', cur, 'pos', '0-0', 'begin', fmt('%d', now),
             'geo', P.geo(g), 'n', 0, 'legacy', m[1] and '0' or '1')
  redis.call('PEXPIRE', state, lock)
  redis.call('DEL', held, partial)
  return {cur + 1, cur, first_id()}
end

if mode == 'read' then
  -- For --verify: the live values and the applied position, read in one step.
  local fin = live_end()
  local out = {fmt('%d', now), fmt('%d', live.g.gen), fin or '', first_id(),
               fmt('%d', live.retention)}
  for i = 20, #ARGV do out[#out + 1] = Snap.read(live, ARGV[i]) or false end
  return out
end

-- chunk / switch
local gen, check = ARGV[9], ARGV[10]
local st = redis.call('HMGET', state, 'gen', 'pos', 'old', 'begin', 'geo', 'n', 'legacy')
if st[1] ~= gen then return redis.error_reply('LOST the rebuild lock expired or was taken over') end
local pos, old_gen = st[2], st[3]
if now - tonumber(st[4]) > hold then
  -- Tracks were kept for hold ms after their chunk; past that, some may be gone.
  return redis.error_reply('SLOW the rebuild took longer than its hold time; run it again')
end
local S = Snap.store(base, P.geometry(st[5]), tonumber(st[6]))
S.now, S.grace, S.retention = now, grace, live.retention
Fold.configure_argv(ARGV, 11)
local fin, has_group = live_end()
local folded, poisoned = 0, 0

-- A job stored by the layout before buckets (an upgrade's first rebuild): its snapshot
-- hash {p}:t<g>:<jid> and its history string {p}:h:<jid> (10-byte IDs, oldest first) as
-- one packed value, or nil.
local function legacy(jid)
  if st[7] ~= '1' then return nil end
  local gs = old_gen == '0' and '' or old_gen
  local h = redis.call('HGETALL', live.tag .. ':t' .. gs .. ':' .. jid)
  local idx = redis.call('GET', live.tag .. ':h:' .. jid) or ''
  local raw = {}
  for i = 1, #h, 2 do raw[h[i]] = h[i + 1] end
  local t
  if P.SCODE[raw.s or ''] and tonumber(raw.u) and tonumber(raw.x) then
    t = {s = raw.s, u = tonumber(raw.u), x = tonumber(raw.x), r = tonumber(raw.r) or 0,
         p = tonumber(raw.p), d = raw.d, q = raw.q}
  end
  local e, n = {}, 0
  for i = 1, #idx - 9, 10 do
    local b = {string.byte(idx, i, i + 9)}
    n = n + 1
    e[n] = {((((b[1] * 256 + b[2]) * 256 + b[3]) * 256 + b[4]) * 256 + b[5]) * 256 + b[6],
            ((b[7] * 256 + b[8]) * 256 + b[9]) * 256 + b[10]}
  end
  return P.value(t, e, n)
end

-- The live value of jid (the old generation's).
local function old_value(jid)
  return Snap.read(live, jid) or legacy(jid)
end

-- Job jid of S without its snapshot when that expired at or before `before`.
local function settle(jid, before)
  local v, key, stub = Snap.read(S, jid)
  local ok, t = pcall(P.decode, v or '')
  if ok and t and t.x <= before then
    local rest = P.strip(v)
    Snap.put(S, jid, key, stub, rest, rest and P.expiry(rest, grace, S.retention))
    Ix.remove(Snap.ix(S, t.s), t.u, jid)
  end
end

local function fold_chunk()
  if not fin then return 0 end
  local entries = redis.call('XRANGE', stream, '(' .. pos, fin, 'COUNT', count)
  if #entries == 0 then return 0 end
  local part = {}
  local batch = Snap.batch(S, false, check ~= '' and function(jid)
    -- Nothing rebuilt yet: if the job's live history starts before the log does, its
    -- beginning was trimmed and this fold cannot rebuild it.
    local v = old_value(jid)
    local ok, ids = pcall(P.entries, v or '')
    if ok and #ids > 0 and id_lt(fmt('%d-%d', ids[#ids][1], ids[#ids][2]), check) then
      part[jid] = true
    end
  end or nil)
  local tracks, load, note = batch.tracks, batch.load, batch.note
  local at
  for _, entry in ipairs(entries) do
    local ev = Fold.decode(entry[2])
    if ev then
      local seq
      at, seq = P.id(entry[1])
      local t = load(ev.j)
      if not part[ev.j] then
        local after = Fold.apply(t, ev, at, ttl)
        tracks[ev.j] = after or false
        if after then note(ev.j, at, seq) end
      end
      folded = folded + 1
    else
      poisoned = poisoned + 1
    end
  end
  local hold_until = now + hold
  for jid, t in pairs(tracks) do
    if part[jid] then
      redis.call('SADD', partial, jid)
    elseif t and at and t.x <= at then
      tracks[jid] = false -- expired before the newest entry: dead for good
    elseif t and t.x + grace <= hold_until then
      -- Real time is past (or near) its expiry, but entries still to fold may be older
      -- than its expiry and meet it: settled at the switch.
      redis.call('ZADD', held, t.x, jid)
    end
  end
  batch.flush()
  if at then
    -- Tracks that expired before the newest folded entry are dead for every later one.
    for _, jid in ipairs(redis.call('ZRANGEBYSCORE', held, '-inf', at, 'LIMIT', 0, 1000)) do
      settle(jid, at)
      redis.call('ZREM', held, jid)
    end
  end
  Snap.expire(S)
  Snap.grow(S, 64)
  pos = entries[#entries][1]
  return #entries
end

if mode == 'chunk' then
  local n = fold_chunk()
  redis.call('HSET', state, 'pos', pos, 'geo', P.geo(S.g), 'n', S.n)
  redis.call('PEXPIRE', state, lock)
  return {folded, poisoned, pos, (n < count) and 1 or 0}
end

-- switch: fold the rest up to the live position, then flip the generation, atomically.
if has_group and pos ~= '0-0' then
  -- A group made during the rebuild (none existed before) may be behind what we folded.
  local excl, id = string.match(fin, '^(%(?)(.*)$')
  if (excl == '(' and not id_lt(pos, id)) or (excl == '' and id_lt(id, pos)) then
    return redis.error_reply('RACE a projector started from the log start during the rebuild')
  end
end
while fold_chunk() == count do end
local kept = 0
for _, jid in ipairs(redis.call('SMEMBERS', partial)) do
  -- Beginning trimmed away: the log cannot rebuild it; keep the live value (snapshot and
  -- history) as it is.
  local v = old_value(jid)
  local _, key, stub = Snap.read(S, jid)
  local ok, e = pcall(P.expiry, v or '', grace, S.retention)
  Snap.put(S, jid, key, stub, ok and v or nil, ok and e or 0)
  local t = ok and P.decode(v)
  if t and t.x > now then
    Ix.add(Snap.ix(S, t.s), t.u, jid)
    kept = kept + 1
  end
end
for _, jid in ipairs(redis.call('ZRANGE', held, 0, -1)) do settle(jid, now) end
Snap.expire(S)
if not has_group and pos ~= '0-0' then
  redis.call('XGROUP', 'CREATE', stream, group, pos, 'MKSTREAM')
end
redis.call('HSET', meta, 'geo', P.geo(S.g), 'n', S.n, 'sw', 0)
redis.call('DEL', state, held, partial)
return {folded, poisoned, pos, kept, old_gen}
