-- trim.lua: drop a partition's entries older than the retention window, never one
-- that a consumer group has not acknowledged or not yet been delivered.
--
-- KEYS[1] stream {p}:log   KEYS[2] meta {p}:meta   KEYS[3] rebuild state {p}:replay
-- KEYS[4] fence {p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1] retention ms    ARGV[2] '1' for a dry run (nothing is removed or stored)
-- ARGV[3] track TTL ms    ARGV[4] job key prefix of generation 0 {p}:b:
-- ARGV[5] the longest reservation, ms (tracker/events.py RESERVE_MAX)
-- Returns {MINID (entries before it go; '' = none), what limited it, removed (-1 on
-- a dry run), state index entries swept}. Limits, lowest wins: now - retention; every group's last-delivered
-- ID (later entries were never read) and oldest pending entry (read, not acked: a
-- dead consumer's entries stay claimable); a running rebuild's position.
-- In one script, so no reader can move between the check and the XTRIM.
-- Prepended at load time with ids.lua, packed.lua, index.lua and snapshot.lua (Snap).

local retention, dry = tonumber(ARGV[1]), ARGV[2] == '1'
local id_lt = Snap.id_lt
local now = Snap.now_ms()

-- The state indexes' entries of tracks that must have expired: a track expires ttl after
-- its last update, or after its reservation, at most RESERVE_MAX past an update.
local swept = 0
if not dry then
  redis.call('HSET', KEYS[2], 'retention', string.format('%d', retention))
  local ttl, longest = tonumber(ARGV[3]), tonumber(ARGV[5])
  local idx = Snap.live(ARGV[4]).idx
  for _, state in ipairs({'enqueued', 'working', 'success', 'failed', 'dead'}) do
    local before = now - ttl - (state == 'working' and longest or 0)
    swept = swept + Ix.sweep(idx .. state, string.format('%d', before))
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'', 'empty log', 0, swept} end
local minid, why = string.format('%d-0', math.max(now - retention, 0)), 'age'
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {'', 'no consumer group yet', 0, swept} end
for _, g in ipairs(groups) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if id_lt(last, minid) then minid, why = last, 'last-delivered of group ' .. name end
  local p = redis.call('XPENDING', KEYS[1], name)
  if p[1] > 0 and id_lt(p[2], minid) then minid, why = p[2], 'pending in group ' .. name end
end
local pos = redis.call('HGET', KEYS[3], 'pos')
if pos and id_lt(pos, minid) then minid, why = pos, 'rebuild in progress' end
if dry then return {minid, why, -1, 0} end
return {minid, why, redis.call('XTRIM', KEYS[1], 'MINID', minid), swept}
