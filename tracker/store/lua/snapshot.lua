-- snapshot.lua: snapshot and history-index I/O shared by project.lua and replay.lua
-- (prepended to both after projections/track.lua), so the live projector and a
-- rebuild store a track the very same way.
--
-- Keys are derived from the generation-0 snapshot prefix '{prefix:p}:t:' with the
-- rules of tracker/store/keys.py (meta, snapshot_prefix_gen, history_prefix); a test
-- checks the two agree.

local Snap = {}
Snap.DEFAULT_RETENTION = 7 * 86400000 -- ms; tracker/retention.py DEFAULT_MS
local fmt = string.format

-- '{prefix:p}:t:' -> '{prefix:p}:meta', '{prefix:p}:h:'
function Snap.keys(base)
  local tag = string.sub(base, 1, -3)
  return tag .. 'meta', tag .. 'h:'
end

-- State index prefix of a snapshot prefix: '{p}:t:' -> '{p}:s:', '{p}:t7:' -> '{p}:s7:'.
-- '{p}:s<g>:<state>' is a sorted set of the generation's tracks in that state, scored
-- by their update time (tracker/store/keys.py state_index): listing by state reads it.
function Snap.index(snap)
  local tag, gen = string.match(snap, '^(.*):t(%d*):$')
  return tag .. ':s' .. gen .. ':'
end

-- Snapshot prefix of generation gen (a string from the meta hash; absent or '0' = base).
function Snap.prefix(base, gen)
  if not gen or gen == '0' or gen == '' then return base end
  return string.sub(base, 1, -2) .. gen .. ':'
end

-- The partition's live settings: snapshot prefix of its generation, retention in ms.
function Snap.settings(meta, base)
  local m = redis.call('HMGET', meta, 'gen', 'retention')
  return Snap.prefix(base, m[1]), tonumber(m[2]) or Snap.DEFAULT_RETENTION, m[1] or '0'
end

-- A snapshot hash as a fold track (nil when absent), and its raw fields (false when absent).
function Snap.load(key)
  local h = redis.call('HGETALL', key)
  if #h == 0 then return nil, false end
  local raw = {}
  for i = 1, #h, 2 do raw[h[i]] = h[i + 1] end
  if not (raw.s and tonumber(raw.u) and tonumber(raw.x)) then
    return nil, raw -- not a snapshot we wrote (edited by hand): as if absent, overwritten
  end
  return {s = raw.s, u = tonumber(raw.u), x = tonumber(raw.x), r = tonumber(raw.r) or 0,
          p = tonumber(raw.p), d = raw.d, q = raw.q}, raw
end

-- (ids.lua, prepended before this file, has the ID comparison and the clock.)
Snap.id_lt, Snap.now_ms = Id.lt, Id.now_ms

-- A batch's tracks: each loaded once (b.tracks[jid] = track, or false when absent),
-- with its stored fields kept for Snap.write (b.orig[jid]). on_miss(jid) runs for a
-- JID that has no snapshot.
function Snap.batch(prefix, on_miss)
  local b = {tracks = {}, orig = {}}
  function b.load(jid)
    local t = b.tracks[jid]
    if t ~= nil then return t or nil end
    local raw
    t, raw = Snap.load(prefix .. jid)
    b.orig[jid] = raw
    b.tracks[jid] = t or false
    if not raw and on_miss then on_miss(jid) end
    return t
  end
  return b
end

-- Store track t (false/nil: delete) of jid under snap, over its raw fields old, the key
-- expiring at expire_at; keep the state index (Snap.index) in step: a track is in the
-- index of its state, scored by its update time.
-- Delete jid's snapshot under snap, and its state index entry.
function Snap.delete(snap, jid)
  local s = redis.call('HGET', snap .. jid, 's')
  if s then redis.call('ZREM', Snap.index(snap) .. s, jid) end
  redis.call('DEL', snap .. jid)
end

local OPTIONAL = {'r', 'p', 'd', 'q'}
function Snap.write(snap, jid, t, old, expire_at)
  local key, idx = snap .. jid, Snap.index(snap)
  if old and old.s and (not t or t.s ~= old.s) then redis.call('ZREM', idx .. old.s, jid) end
  if not t then
    if old then redis.call('DEL', key) end
    return
  end
  local args = {'HSET', key, 's', t.s, 'u', fmt('%d', t.u), 'x', fmt('%d', t.x)}
  local new = {r = t.r > 0 and fmt('%d', t.r) or nil, p = t.p and fmt('%d', t.p), d = t.d, q = t.q}
  local gone = {}
  for _, f in ipairs(OPTIONAL) do
    if new[f] then
      args[#args + 1] = f; args[#args + 1] = new[f]
    elseif old and old[f] then gone[#gone + 1] = f end
  end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  redis.call(unpack(args))
  redis.call('PEXPIREAT', key, fmt('%d', expire_at))
  redis.call('ZADD', idx .. t.s, fmt('%d', t.u), jid)
end

-- Entry ID '<ms>-<seq>' as 10 bytes: 6 of ms, 4 of seq (capped), big-endian, so
-- byte order is ID order.
local char, floor, match = string.char, math.floor, string.match
function Snap.pack_id(id)
  local ms, seq = match(id, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if seq > 4294967295 then seq = 4294967295 end
  local hi, lo = floor(ms / 16777216), ms % 16777216
  local shi, slo = floor(seq / 65536), seq % 65536
  return char(floor(hi / 65536), floor(hi / 256) % 256, hi % 256,
              floor(lo / 65536), floor(lo / 256) % 256, lo % 256,
              floor(shi / 256), shi % 256, floor(slo / 256), slo % 256)
end

function Snap.unpack_id(s, i)
  local b1, b2, b3, b4, b5, b6, b7, b8, b9, b10 = string.byte(s, i, i + 9)
  local ms = ((((b1 * 256 + b2) * 256 + b3) * 256 + b4) * 256 + b5) * 256 + b6
  return fmt('%d-%d', ms, ((b7 * 256 + b8) * 256 + b9) * 256 + b10)
end

-- History index: note an entry of jid (time at) in the batch's buffer idx ...
function Snap.note(idx, jid, id, at)
  local e = idx[jid]
  if not e then e = {n = 0}; idx[jid] = e end
  e.n = e.n + 1
  e[e.n] = Snap.pack_id(id)
  e.at = at
end

-- ... and append each buffer to '{p}:h:<jid>', which expires retention ms after its
-- newest entry (GET + SET keeps the string exactly sized; APPEND would over-allocate).
function Snap.flush_index(hist, idx, retention)
  for jid, e in pairs(idx) do
    local key = hist .. jid
    local old = redis.call('GET', key) or ''
    redis.call('SET', key, old .. table.concat(e), 'PXAT', fmt('%d', e.at + retention))
  end
end
