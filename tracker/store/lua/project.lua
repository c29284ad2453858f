-- project.lua: fold the next batch of one partition and acknowledge it, atomically.
-- Prepended at load time with projections/track.lua (the Fold table), ids.lua,
-- packed.lua (P: the stored value) and snapshot.lua (Snap: buckets, generations).
--
-- KEYS[1]  the partition's stream            {prefix:p}:log
-- KEYS[2]  its dead-letter stream            {prefix:p}:dlq
-- KEYS[3]  its stats hash                    {prefix:p}:stats
-- KEYS[4]  its fence (never written)          {prefix:p}:fence  (see tracker/store/keys.py)
-- ARGV[1]  consumer group name
-- ARGV[2]  consumer name
-- ARGV[3]  batch size (entries)
-- ARGV[4]  job key prefix of generation 0    {prefix:p}:b:  (the live generation, its
--          bucket geometry and the retention are read from {prefix:p}:meta, see snapshot.lua)
-- ARGV[5]  track TTL, ms
-- ARGV[6]  expiry grace, ms (a snapshot outlives its logical expiry by this for the fold)
-- ARGV[7]  min idle time, ms, before a foreign consumer's pending entries are claimed
-- ARGV[8]  dead-letter stream cap (approximate MAXLEN)
-- ARGV[9..17] limits: max_jid max_desc max_errtype max_message max_name max_int
--             reserve_default reserve_min reserve_max
-- Returns {entries folded, entries dead-lettered, last ID, claimed, waiting}: the last
-- ID is the batch's last entry, or with an empty batch the stream's newest entry.
-- Writes {prefix:p}:meta pos, the newest entry folded, which get.lua reads, n (the
-- generation's field count) and, after splits, geo.
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
local meta = string.sub(snap, 1, -4) .. ':meta'

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
local S, m = Snap.live(snap)
S.grace = grace
local batch = Snap.batch(S, true)
local tracks, load, note = batch.tracks, batch.load, batch.note
local ids, poisoned = {}, 0

for i, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  ids[i] = id
  local ev, reason = Fold.decode(fields)
  if ev then
    local at, seq = P.id(id)
    local after = Fold.apply(load(ev.j), ev, at, ttl)
    tracks[ev.j] = after or false
    -- Index every event that met or made a live track (the others are no-ops of the fold:
    -- an event that meets a live track always leaves one).
    if after then note(ev.j, at, seq) end
  else
    poisoned = poisoned + 1
    local args = {'XADD', dlq, 'MAXLEN', '~', dlq_max, '*', 'id', id, 'reason', reason}
    for k = 1, #fields do args[#args + 1] = fields[k] end
    redis.call(unpack(args))
  end
end
batch.flush()
Snap.expire(S)
local grew = Snap.grow(S, 4) > 0

redis.call('XACK', stream, group, unpack(ids))
-- The newest entry folded, for readers (get.lua); entries claimed from another reader
-- are older than what the group already delivered, so they do not move it.
local set = {'HSET', meta, 'n', S.n}
if claimed == 0 then set[#set + 1] = 'pos'; set[#set + 1] = ids[#ids] end
if grew or not m[1] then set[#set + 1] = 'geo'; set[#set + 1] = P.geo(S.g) end
redis.call(unpack(set))
redis.call('HINCRBY', stats, 'applied', #entries - poisoned)
if poisoned > 0 then redis.call('HINCRBY', stats, 'dead_lettered', poisoned) end
return {#entries, poisoned, ids[#ids], claimed, 0}
