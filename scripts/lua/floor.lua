-- floor.lua: the least work an in-Redis fold of one batch can do, for scripts/bench_floor.py.
-- Prepended by that script with projections/track.lua (Fold), tracker/store/lua/ids.lua and
-- packed.lua (P.id), the very code project.lua and replay.lua run. It stores nothing: no
-- snapshot is loaded or written, no history noted, no index kept, so its rate is a ceiling
-- that the real scripts (which do all of that too) cannot pass on the same machine.
--
-- KEYS[1]  a partition's stream               {prefix:p}:log
-- ARGV[1]  mode: group-read   XREADGROUP the next batch and XACK it (project.lua's read)
--                group-fold   the same, and decode + fold every entry in the batch
--                range-read   XRANGE the batch after ARGV[5] (replay.lua's read)
--                range-fold   the same, and decode + fold every entry
-- ARGV[2]  consumer group      ARGV[3] consumer      ARGV[4] batch size (entries)
-- ARGV[5]  the ID to read after (range modes; '0-0' for the start)
-- ARGV[6]  track TTL, ms
-- ARGV[7..15] the fold's limits (tracker.store.scripts.LIMITS)
-- Returns {entries read, the batch's last ID or ''}.

local stream, mode = KEYS[1], ARGV[1]
local group, consumer, count, after = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local ttl = tonumber(ARGV[6])
Fold.configure_argv(ARGV, 7)

local entries = {}
local grouped = string.sub(mode, 1, 5) == 'group'
if grouped then
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
                           'STREAMS', stream, '>')
  if reply and #reply > 0 then entries = reply[1][2] end
else
  entries = redis.call('XRANGE', stream, '(' .. after, '+', 'COUNT', count)
end
if #entries == 0 then return {0, ''} end

if string.sub(mode, -4) == 'fold' then
  local tracks = {}
  for _, entry in ipairs(entries) do
    local ev = Fold.decode(entry[2])
    if ev then
      local at = P.id(entry[1])
      local t = tracks[ev.j]
      tracks[ev.j] = Fold.apply(t or nil, ev, at, ttl) or false
    end
  end
end
if grouped then
  local ids = {}
  for i, entry in ipairs(entries) do ids[i] = entry[1] end
  redis.call('XACK', stream, group, unpack(ids))
end
return {#entries, entries[#entries][1]}
