-- sweep.lua: the expiry of stored jobs, a few buckets of the live generation per call.
-- Prepended with ids.lua, packed.lua, index.lua and snapshot.lua (Snap). Driven by
-- tracker/retention.py (Sweeper), which calls it so that every bucket is visited about
-- once per min(10 min, retention / 10).
--
-- KEYS[1]  the partition's meta hash {p}:meta (geo, retention, sw: the next bucket)
-- KEYS[2]  its fence {p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  job key prefix of generation 0 {p}:b:
-- ARGV[2]  visit at most this many buckets   ARGV[3] ... and stop once this many fields
--          were looked at                    ARGV[4] expiry grace, ms
-- Returns {buckets visited, fields looked at, deleted, stripped, healed, buckets in all}.
--
-- Jobs share bucket keys, so no key expiry can remove one job: here a field whose
-- snapshot and history are both dead (P.expiry) is deleted, one whose snapshot alone has
-- expired for good (x + grace) is stripped to its history (half its bytes), and a bucket
-- that converted to a hashtable and fits again is rewritten as a listpack. Readers and
-- the fold already treat what is dead as absent, so nothing depends on when this runs.

local S = Snap.live(ARGV[1])
local maxb, maxf, grace = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
S.grace = grace
local now, retention = S.now, S.retention
local total = P.count(S.g)
if maxb > total then maxb = total end -- each bucket at most once per call
local cur = (tonumber(redis.call('HGET', S.meta, 'sw') or '0') or 0) % total
local visited, looked, deleted, stripped, healed = 0, 0, 0, 0, 0

-- What to do with value v: 'dead', a stripped value, or nil (keep); and the snapshot
-- when it goes (for the state index).
local function judge(v)
  local t = P.decode(v)
  if P.expiry(v, grace, retention) <= now then return 'dead', t end
  if t and t.x + grace <= now then return P.strip(v) or 'dead', t end
  return nil
end

while visited < maxb and looked < maxf do
  local key = S.bpre .. cur
  local h = redis.call('HGETALL', key)
  local dead, keep = {}, {}
  for i = 1, #h, 2 do
    local jid, v = h[i], h[i + 1]
    local over = v == P.STUB and S.vpre .. jid
    if over then v = redis.call('GET', over) end
    if not v then
      dead[#dead + 1] = jid -- a stub whose overflow string has expired
    else
      local ok, verdict, t = pcall(judge, v)
      if not ok then verdict, t = nil, nil end -- not a value tracker wrote: left alone
      if t then Ix.remove(Snap.ix(S, t.s), t.u, jid) end
      if verdict == 'dead' then
        dead[#dead + 1] = jid
        if over then redis.call('DEL', over) end
      elseif verdict then
        stripped = stripped + 1
        if not over then
          keep[#keep + 1] = jid
          keep[#keep + 1] = verdict
        elseif #verdict <= P.CAP then -- fits in the bucket again
          keep[#keep + 1] = jid
          keep[#keep + 1] = verdict
          redis.call('DEL', over)
        else
          redis.call('SET', over, verdict, 'KEEPTTL')
        end
      end
    end
  end
  looked = looked + #h / 2
  if #dead > 0 then
    Snap.many('HDEL', key, dead)
    deleted = deleted + #dead
  end
  if #keep > 0 then Snap.many('HSET', key, keep) end
  local left = #h / 2 - #dead
  if left > 0 and left <= Snap.LISTPACK and Snap.hashtable(key) then
    Snap.heal(key, redis.call('HGETALL', key))
    healed = healed + 1
  end
  visited = visited + 1
  cur = (cur + 1) % total
end
redis.call('HSET', S.meta, 'sw', cur)
if deleted > 0 then redis.call('HINCRBY', S.meta, 'n', -deleted) end
return {visited, looked, deleted, stripped, healed, total}
