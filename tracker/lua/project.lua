-- project.lua: fold the next batch of one partition and acknowledge it, atomically.
-- Prepended at load time with projections/track.lua (the Fold table).
--
-- KEYS[1]  the partition's stream            {prefix:p}:log
-- KEYS[2]  its dead-letter stream            {prefix:p}:dlq
-- KEYS[3]  its stats hash                    {prefix:p}:stats
-- ARGV[1]  consumer group name
-- ARGV[2]  consumer name
-- ARGV[3]  batch size (entries)
-- ARGV[4]  snapshot key prefix               {prefix:p}:t:
-- ARGV[5]  track TTL, ms
-- ARGV[6]  expiry grace, ms (snapshot keys outlive their logical expiry by this)
-- ARGV[7]  min idle time, ms, before a foreign consumer's pending entries are claimed
-- ARGV[8]  dead-letter stream cap (approximate MAXLEN)
-- ARGV[9..17] limits: max_jid max_desc max_errtype max_message max_name max_int
--             reserve_default reserve_min reserve_max
-- Returns {entries folded, entries dead-lettered, last ID, claimed, waiting}: the last
-- ID is the batch's last entry, or with an empty batch the stream's newest entry.
--
-- Why this shape: the read (XREADGROUP), the fold, the snapshot writes and the
-- XACK happen in one script, so Redis runs them as one step. An entry is
-- therefore applied exactly once, and in stream order, however many projector
-- processes run and wherever one of them crashes: there is no moment at which
-- an entry is delivered but not yet applied. (A script's writes reach the AOF
-- and replicas as one MULTI/EXEC.) Pending entries can only come from a reader
-- outside tracker; they are claimed after ARGV[7] ms idle and folded first.

local stream, dlq, stats = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local snap, ttl, grace = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local claim_idle, dlq_max = tonumber(ARGV[7]), tonumber(ARGV[8])
Fold.configure({
  max_jid = tonumber(ARGV[9]), max_desc = tonumber(ARGV[10]), max_errtype = tonumber(ARGV[11]),
  max_message = tonumber(ARGV[12]), max_name = tonumber(ARGV[13]), max_int = tonumber(ARGV[14]),
  reserve_default = tonumber(ARGV[15]), reserve_min = tonumber(ARGV[16]),
  reserve_max = tonumber(ARGV[17]),
})

local entries, claimed = {}, 0
local first = redis.call('XPENDING', stream, group, '-', '+', 1)
if #first > 0 then
  -- Entries someone read but never acknowledged. Keep stream order: fold them
  -- before anything newer, and wait while the oldest is still held by a live reader.
  local reply = redis.call('XAUTOCLAIM', stream, group, consumer, claim_idle, '0-0',
                           'COUNT', count, 'JUSTID')
  local ids = reply[2] -- Redis 7 adds a third element (deleted IDs); 6.2 does not
  if #ids == 0 or ids[1] ~= first[1][1] then return {0, 0, '', 0, 1} end
  for _, id in ipairs(ids) do
    local found = redis.call('XRANGE', stream, id, id)
    if #found == 1 then
      entries[#entries + 1] = found[1]
    else
      redis.call('XACK', stream, group, id) -- trimmed or deleted meanwhile
    end
  end
  claimed = #ids
else
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
                           'STREAMS', stream, '>')
  if reply and #reply > 0 then
    -- Redis answers {{stream, entries}}; fakeredis (unit tests) drops the outer array.
    if type(reply[1]) == 'table' then entries = reply[1][2] else entries = reply[2] end
  end
end
if #entries == 0 then
  -- Nothing to fold: return the newest ID so the caller can block for anything later.
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  return {0, 0, newest[1] and newest[1][1] or '0-0', claimed, 0}
end

local tracks, orig, ids, poisoned = {}, {}, {}, 0
local function load(jid)
  local t = tracks[jid]
  if t ~= nil then return t or nil end
  local h = redis.call('HGETALL', snap .. jid)
  if #h == 0 then
    orig[jid] = false
    tracks[jid] = false
    return nil
  end
  local raw = {}
  for i = 1, #h, 2 do raw[h[i]] = h[i + 1] end
  orig[jid] = raw
  t = {s = raw.s, u = tonumber(raw.u), x = tonumber(raw.x), r = tonumber(raw.r) or 0,
       p = tonumber(raw.p), d = raw.d}
  tracks[jid] = t
  return t
end

for i, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  ids[i] = id
  local ev, reason = Fold.decode(fields)
  if ev then
    local at = tonumber(string.match(id, '^(%d+)'))
    tracks[ev.j] = Fold.apply(load(ev.j), ev, at, ttl) or false
  else
    poisoned = poisoned + 1
    local args = {'XADD', dlq, 'MAXLEN', '~', dlq_max, '*', 'id', id, 'reason', reason}
    for k = 1, #fields do args[#args + 1] = fields[k] end
    redis.call(unpack(args))
  end
end

local fmt = string.format
for jid, t in pairs(tracks) do
  local key, old = snap .. jid, orig[jid]
  if t == false then
    if old then redis.call('DEL', key) end
  else
    local args = {'HSET', key, 's', t.s, 'u', fmt('%d', t.u), 'x', fmt('%d', t.x)}
    local gone = {}
    if t.r > 0 then
      args[#args + 1] = 'r'; args[#args + 1] = fmt('%d', t.r)
    elseif old and old.r then gone[#gone + 1] = 'r' end
    if t.p then
      args[#args + 1] = 'p'; args[#args + 1] = fmt('%d', t.p)
    elseif old and old.p then gone[#gone + 1] = 'p' end
    if t.d then
      args[#args + 1] = 'd'; args[#args + 1] = t.d
    elseif old and old.d then gone[#gone + 1] = 'd' end
    if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
    redis.call(unpack(args))
    redis.call('PEXPIREAT', key, fmt('%d', t.x + grace))
  end
end

redis.call('XACK', stream, group, unpack(ids))
redis.call('HINCRBY', stats, 'applied', #entries - poisoned)
if poisoned > 0 then redis.call('HINCRBY', stats, 'dead_lettered', poisoned) end
return {#entries, poisoned, ids[#ids], claimed, 0}
