-- replay.lua: rebuild a partition's snapshots from its log into a new generation,
-- while the live projector keeps going. Prepended with projections/track.lua (Fold)
-- and tracker/store/lua/snapshot.lua (Snap), so a rebuild folds and stores exactly as
-- project.lua does. Driven by tracker/replay.py.
--
-- KEYS[1] stream {p}:log   KEYS[2] meta {p}:meta   KEYS[3] state {p}:replay
-- KEYS[4] held {p}:replay:held   KEYS[5] partial {p}:replay:partial
-- KEYS[6] fence {p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1] mode: begin | chunk | switch | read
-- ARGV[2] snapshot prefix of generation 0 {p}:t:    ARGV[3] consumer group
-- ARGV[4] entries per chunk   ARGV[5] ttl ms   ARGV[6] grace ms
-- ARGV[7] hold ms: a track whose key would expire within this is kept until the
--         switch (its log position may still be before its expiry), which must
--         come within hold ms of the begin
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
-- flips {p}:meta gen in one script, so project.lua and get.lua (which read gen in
-- their own atomic steps) go from the old generation to an equal new one at once.

local stream, meta, state, held, partial = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode, base, group = ARGV[1], ARGV[2], ARGV[3]
local count, ttl, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local hold, lock = tonumber(ARGV[7]), tonumber(ARGV[8])
local _, hist = Snap.keys(base)
local fmt = string.format

local now = Snap.now_ms()
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

if mode == 'begin' then
  if redis.call('EXISTS', state) == 1 then
    return redis.error_reply('BUSY a rebuild of this partition is already running')
  end
  local cur = tonumber(redis.call('HGET', meta, 'gen') or '0')
  redis.call('HSET', state, 'gen', cur + 1, 'old', cur, 'pos', '0-0', 'begin', fmt('%d', now))
  redis.call('PEXPIRE', state, lock)
  redis.call('DEL', held, partial)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  return {cur + 1, cur, first[1] and first[1][1] or ''}
end

if mode == 'read' then
  -- For --verify: the live snapshots and the applied position, read in one step.
  local prefix, _r, gen = Snap.settings(meta, base)
  local fin = live_end()
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  local out = {fmt('%d', now), gen, fin or '', first[1] and first[1][1] or ''}
  for i = 20, #ARGV do
    out[#out + 1] = redis.call('HMGET', prefix .. ARGV[i], 's', 'p', 'd', 'u', 'r', 'x', 'q')
    out[#out + 1] = redis.call('GETRANGE', hist .. ARGV[i], 0, 9)
  end
  return out
end

-- chunk / switch
local gen, check = ARGV[9], ARGV[10]
local st = redis.call('HMGET', state, 'gen', 'pos', 'old', 'begin')
if st[1] ~= gen then return redis.error_reply('LOST the rebuild lock expired or was taken over') end
local pos, old_gen = st[2], st[3]
if now - tonumber(st[4]) > hold then
  -- Tracks were written expiring hold ms after their chunk; past that, some may be gone.
  return redis.error_reply('SLOW the rebuild took longer than its hold time; run it again')
end
local snap = Snap.prefix(base, gen)
Fold.configure_argv(ARGV, 11)
local fin, has_group = live_end()
local folded, poisoned = 0, 0

local function fold_chunk()
  if not fin then return 0 end
  local entries = redis.call('XRANGE', stream, '(' .. pos, fin, 'COUNT', count)
  if #entries == 0 then return 0 end
  local part = {}
  local batch = Snap.batch(snap, check ~= '' and function(jid)
    -- No snapshot yet: if the job's history starts before the log does, its
    -- beginning was trimmed and this fold cannot rebuild it.
    local head = redis.call('GETRANGE', hist .. jid, 0, 9)
    if #head == 10 and id_lt(Snap.unpack_id(head, 1), check) then part[jid] = true end
  end or nil)
  local tracks, orig, load = batch.tracks, batch.orig, batch.load
  local at
  for _, entry in ipairs(entries) do
    local ev = Fold.decode(entry[2])
    if ev then
      at = tonumber(string.match(entry[1], '^(%d+)'))
      local t = load(ev.j)
      if not part[ev.j] then tracks[ev.j] = Fold.apply(t, ev, at, ttl) or false end
      folded = folded + 1
    else
      poisoned = poisoned + 1
    end
  end
  local hold_until = now + hold
  for jid, t in pairs(tracks) do
    if part[jid] then
      redis.call('SADD', partial, jid)
    else
      if t and at and t.x <= at then t = false end -- expired before the newest entry: dead for good
      local expire_at = t and t.x + grace
      if t and expire_at <= hold_until then
        -- Real time is past (or near) its expiry, but entries still to fold may be older
        -- than its expiry and meet it: keep it until the switch settles it.
        expire_at = hold_until
        redis.call('ZADD', held, t.x, jid)
      end
      Snap.write(snap, jid, t, orig[jid], expire_at)
    end
  end
  if at then
    -- Tracks that expired before the newest folded entry are dead for every later one.
    local dead = redis.call('ZRANGEBYSCORE', held, '-inf', at, 'LIMIT', 0, 1000)
    for _, jid in ipairs(dead) do
      local x = redis.call('HGET', snap .. jid, 'x')
      if x and tonumber(x) <= at then Snap.delete(snap, jid) end
      redis.call('ZREM', held, jid)
    end
  end
  pos = entries[#entries][1]
  return #entries
end

if mode == 'chunk' then
  local n = fold_chunk()
  redis.call('HSET', state, 'pos', pos)
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
local old_snap = Snap.prefix(base, old_gen)
local kept = 0
for _, jid in ipairs(redis.call('SMEMBERS', partial)) do
  -- Beginning trimmed away: the log cannot rebuild it, keep the live snapshot.
  local t, raw = Snap.load(old_snap .. jid)
  Snap.delete(snap, jid)
  if t and t.x > now then
    Snap.write(snap, jid, t, false, t.x + grace)
    kept = kept + 1
  end
end
for _, jid in ipairs(redis.call('ZRANGE', held, 0, -1)) do
  local x = redis.call('HGET', snap .. jid, 'x')
  if x then
    if tonumber(x) <= now then Snap.delete(snap, jid) -- expired: not recreated
    else redis.call('PEXPIREAT', snap .. jid, fmt('%d', tonumber(x) + grace)) end
  end
end
if not has_group and pos ~= '0-0' then
  redis.call('XGROUP', 'CREATE', stream, group, pos, 'MKSTREAM')
end
redis.call('HSET', meta, 'gen', gen)
redis.call('DEL', state, held, partial)
return {folded, poisoned, pos, kept, old_gen}
