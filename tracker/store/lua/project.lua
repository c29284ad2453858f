-- project.lua: fold the next batch of one partition and acknowledge it, atomically.
-- Prepended at load time with projections/track.lua (the Fold table) and
-- tracker/store/lua/snapshot.lua (Snap: snapshot and history-index I/O, generations).
--
-- KEYS[1]  the partition's stream            {prefix:p}:log
-- KEYS[2]  its dead-letter stream            {prefix:p}:dlq
-- KEYS[3]  its stats hash                    {prefix:p}:stats
-- KEYS[4]  its fence (never written)          {prefix:p}:fence  (see tracker/store/keys.py)
-- ARGV[1]  consumer group name
-- ARGV[2]  consumer name
-- ARGV[3]  batch size (entries)
-- ARGV[4]  snapshot key prefix               {prefix:p}:t:  (generation 0; the live
--          generation and the retention are read from {prefix:p}:meta, see snapshot.lua)
-- ARGV[5]  track TTL, ms
-- ARGV[6]  expiry grace, ms (snapshot keys outlive their logical expiry by this)
-- ARGV[7]  min idle time, ms, before a foreign consumer's pending entries are claimed
-- ARGV[8]  dead-letter stream cap (approximate MAXLEN)
-- ARGV[9..17] limits: max_jid max_desc max_errtype max_message max_name max_int
--             reserve_default reserve_min reserve_max
-- Returns {entries folded, entries dead-lettered, last ID, claimed, waiting}: the last
-- ID is the batch's last entry, or with an empty batch the stream's newest entry.
-- Writes {prefix:p}:meta pos, the newest entry folded, which get.lua reads.
--
-- Why this shape: the read (XREADGROUP), the fold, the snapshot writes and the
-- XACK happen in one script, so Redis runs them as one step. An entry is
-- therefore applied exactly once, and in stream order, however many projector
-- processes run and wherever one of them crashes: there is no moment at which
-- an entry is delivered but not yet applied. (A script's writes reach the AOF
-- and replicas as one MULTI/EXEC.) Pending entries can only come from a reader
-- outside tracker; they are taken over after ARGV[7] ms idle and folded first.

local stream, dlq, stats = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local snap, ttl, grace = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local claim_idle, dlq_max = tonumber(ARGV[7]), tonumber(ARGV[8])
Fold.configure_argv(ARGV, 9)

local entries, claimed = {}, 0
local pending = redis.call('XPENDING', stream, group, '-', '+', count)
if #pending > 0 then
  -- Entries someone read but never acknowledged (only a reader outside tracker can
  -- leave them: our own reads are acknowledged in this same script). Keep stream
  -- order: take them from the oldest on and stop at the first one still idle for
  -- less than ARGV[7] (a live reader may hold it); wait while the oldest is. No
  -- XCLAIM/XAUTOCLAIM: they are folded and acknowledged right here. XAUTOCLAIM
  -- skips a pending entry that is not idle enough and claims the idle ones after
  -- it, which would fold them out of order, or leave them pending on this consumer
  -- (where XGROUP DELCONSUMER on exit would drop them).
  for _, p in ipairs(pending) do
    if tonumber(p[3]) < claim_idle then break end
    local found = redis.call('XRANGE', stream, p[1], p[1])
    if #found == 1 then
      entries[#entries + 1] = found[1]
    else
      redis.call('XACK', stream, group, p[1]) -- trimmed or deleted meanwhile
    end
    claimed = claimed + 1
  end
  if #entries == 0 then return {0, 0, '', claimed, 1} end
else
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
                           'STREAMS', stream, '>')
  if reply and #reply > 0 then
    -- Redis answers {{stream, entries}}; fakeredis (unit tests) drops the outer array.
    if type(reply[1]) == 'table' then entries = reply[1][2] else entries = reply[2] end
  end
end
-- The live generation's snapshot prefix and the history index (see snapshot.lua).
local meta, hist = Snap.keys(snap)

if #entries == 0 then
  -- Nothing to fold: everything delivered is folded, so the fold stands at the newest
  -- entry (get.lua compares it with what a reader needs). Return that ID so the caller
  -- can block for anything later.
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  newest = newest[1] and newest[1][1] or '0-0'
  if claimed == 0 and newest ~= '0-0' and redis.call('HGET', meta, 'pos') ~= newest then
    redis.call('HSET', meta, 'pos', newest)
  end
  return {0, 0, newest, claimed, 0}
end
local retention
snap, retention = Snap.settings(meta, snap)

local batch = Snap.batch(snap)
local tracks, load = batch.tracks, batch.load
local ids, poisoned, hidx = {}, 0, {}

for i, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  ids[i] = id
  local ev, reason = Fold.decode(fields)
  if ev then
    local at = tonumber(string.match(id, '^(%d+)'))
    local before = load(ev.j)
    local after = Fold.apply(before, ev, at, ttl)
    tracks[ev.j] = after or false
    -- Index every event that met or made a live track (others are no-ops of the fold).
    if after or (before and before.x > at) then Snap.note(hidx, ev.j, id, at) end
  else
    poisoned = poisoned + 1
    local args = {'XADD', dlq, 'MAXLEN', '~', dlq_max, '*', 'id', id, 'reason', reason}
    for k = 1, #fields do args[#args + 1] = fields[k] end
    redis.call(unpack(args))
  end
end

for jid, t in pairs(tracks) do
  Snap.write(snap, jid, t, batch.orig[jid], t and t.x + grace)
end
Snap.flush_index(hist, hidx, retention)

redis.call('XACK', stream, group, unpack(ids))
-- The newest entry folded, for readers (get.lua); entries claimed from another reader
-- are older than what the group already delivered, so they do not move it.
if claimed == 0 then redis.call('HSET', meta, 'pos', ids[#ids]) end
redis.call('HINCRBY', stats, 'applied', #entries - poisoned)
if poisoned > 0 then redis.call('HINCRBY', stats, 'dead_lettered', poisoned) end
return {#entries, poisoned, ids[#ids], claimed, 0}
