-- count.lua: how many tracks of one partition are in each state, from the state index.
-- Prepended with ids.lua (Id), packed.lua (P) and index.lua (Ix).
--
-- KEYS[1]  the partition's meta hash {prefix:p}:meta (geo: the live generation)
-- KEYS[2]  its fence {prefix:p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  job key prefix of generation 0   {prefix:p}:b:
-- ARGV[2]  the track TTL, ms
-- ARGV[3..] the states
-- Returns the count per state, in ARGV order: the index entries updated within the TTL
-- (Redis's clock), which is every live track but a working one whose reservation keeps it
-- alive longer than the TTL after its last update. A gauge, not a listing: list.lua checks
-- each entry against its snapshot. A page whose label is inside the window counts whole
-- (ZCARD, O(1)); the first one that is not is counted in part, and the older ones not at all.

local now = Id.now_ms()
local g = P.geometry(redis.call('HGET', KEYS[1], 'geo') or nil)
local tag = string.sub(ARGV[1], 1, -4)
local gs = g.gen == 0 and '' or string.format('%d', g.gen)
local since = now - tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local dir = tag .. ':s' .. gs .. ':' .. ARGV[i] -- Snap.store's idx
  local n, off, done = 0, 0, false
  while not done do
    local labels = redis.call('ZREVRANGE', dir, off, off + 63, 'WITHSCORES')
    off = off + 64
    if #labels < 128 then
      labels[#labels + 1], labels[#labels + 2] = '0', '0'
      done = true
    end
    for j = 1, #labels, 2 do
      local key = dir .. ':' .. labels[j]
      if tonumber(labels[j + 1]) > since then
        n = n + redis.call('ZCARD', key)
      else
        n = n + redis.call('ZCOUNT', key, string.format('(%d', since), '+inf')
        done = true
        break
      end
    end
  end
  out[#out + 1] = n
end
return out
