-- packed.lua: one job's stored value (its snapshot and its history index in one string)
-- and where it lives. Prepended to every script that reads or writes jobs (see
-- tracker/store/scripts.py). tracker/store/packed.py is its Python twin (tests compare the
-- two on random values); the README's "Storage" section describes the layout.
--
-- Where: job jid of generation g of partition {prefix:p} is one field of a bucket hash
-- {prefix:p}:b<g>:<n> (g is '' for generation 0), n chosen by linear hashing on the first
-- 32 bits of SHA-1(jid), with the geometry 'g:b0:level:split' in the partition's meta hash
-- (field geo). A value longer than P.CAP bytes lives in the overflow string
-- {prefix:p}:v<g>:<jid>, the bucket holding the 1-byte stub P.STUB; a JID longer than P.CAP
-- bytes has only the overflow string. So every bucket stays a listpack (ziplist on 6.2),
-- whose entries cost a few bytes instead of a key's ~100.
--
-- The value (all integers unsigned; varint = LEB128, 7 bits per byte, low group first):
--   H      1 byte: bits 0-2 state (0 none: history only, 1 enqueued, 2 working, 3 success,
--          4 failed, 5 dead), bit 3 percent, bit 4 desc, bit 5 reservation, bit 6 queue
--          present; 0x80 alone is the stub
--   T      6 bytes big-endian: updated_at (ms) with a snapshot, else the newest entry's ms
--   if state ~= 0: varint(x - max(u, r)), [varint(zigzag(r - u))], [percent byte],
--          [varint(#desc) desc], [varint(#queue) queue]
--   then the history, newest entry first: varint(previous ms - ms) varint(seq) per entry,
--          the previous ms of the first entry being T.
--
-- P.hash(jid), P.addr(h, g)     bucket number of a JID under geometry g
-- P.geometry(s), P.geo(g)       meta 'geo' <-> {gen, b0, bl, bs}; P.count(g) buckets
-- P.decode(v) -> track|nil, i, T   snapshot, offset of the first entry, T
-- P.head(t, T)                  H T [tail] of track t (or of a history-only value at T)
-- P.value(t, e, n, h0, q0, rest)  a whole value: track t (nil: history only), entries
--                               e[1..n] ({ms, seq}, oldest first), then an older history
-- P.entry(v, i) -> md, seq, j   one history entry at offset i
-- P.entries(v) -> {{ms, seq}...} newest first;  P.expiry(v, grace, retention)
-- P.strip(v)                    the value without its snapshot (nil: nothing left)

local P = {}
P.CAP = 64 -- longest field or value kept in a bucket (hash-max-listpack-value's default)
P.ALPHA = 40 -- mean fields per bucket before the next split (max fill stays < 128)
P.B0 = 1 -- buckets of a new generation 0
P.STUB = '\128'
P.STATES = {'enqueued', 'working', 'success', 'failed', 'dead'}
P.SCODE = {enqueued = 1, working = 2, success = 3, failed = 4, dead = 5}
P.SEQ_MAX = 4294967295 -- longer sequence numbers are capped (as the old 10-byte index did)

local byte, char, sub, floor, fmt, match = string.byte, string.char, string.sub, math.floor,
  string.format, string.match

-- SHA-1 is C inside Redis (~1 us whatever the JID's length).
function P.hash(jid)
  return tonumber(sub(redis.sha1hex(jid), 1, 8), 16)
end

function P.geometry(s)
  if not s then return {gen = 0, b0 = P.B0, bl = 0, bs = 0} end
  local g, b0, bl, bs = match(s, '^(%d+):(%d+):(%d+):(%d+)$')
  return {gen = tonumber(g), b0 = tonumber(b0), bl = tonumber(bl), bs = tonumber(bs)}
end

function P.geo(g)
  return fmt('%d:%d:%d:%d', g.gen, g.b0, g.bl, g.bs)
end

function P.count(g)
  return g.b0 * 2 ^ g.bl + g.bs
end

-- Linear hashing: b0 * 2^bl buckets, the first bs of them already split in two.
function P.addr(h, g)
  local n = g.b0 * 2 ^ g.bl
  local a = h % n
  if a < g.bs then a = h % (2 * n) end
  return a
end

local function varint(n)
  if n < 128 then
    if n < 0 then n = 0 end -- never written by the fold; a value must not stop a partition
    return char(n)
  end
  if n < 16384 then return char(n % 128 + 128, floor(n / 128)) end
  local out, k = {}, 0
  while n >= 128 do
    k = k + 1
    out[k] = n % 128 + 128
    n = floor(n / 128)
  end
  out[k + 1] = n
  return char(unpack(out))
end
P.varint = varint

local function rvar(v, i)
  local c = byte(v, i)
  if c < 128 then return c, i + 1 end
  local n, mul = c - 128, 128
  while true do
    i = i + 1
    c = byte(v, i)
    if c < 128 then return n + c * mul, i + 1 end
    n = n + (c - 128) * mul
    mul = mul * 128
  end
end
P.rvar = rvar

local function u48(n)
  local lo = n % 16777216
  local hi = (n - lo) / 16777216
  return char(floor(hi / 65536) % 256, floor(hi / 256) % 256, hi % 256,
              floor(lo / 65536), floor(lo / 256) % 256, lo % 256)
end
P.u48 = u48

-- Decode the snapshot part: track {s, u, x, r, p, d, q} (nil for a history-only value), the
-- offset of the first history entry, T. Errors on a value this file did not write (callers
-- that must not fail use pcall).
function P.decode(v)
  local h = byte(v, 1)
  local a, b, c, d, e, f = byte(v, 2, 7)
  local T = ((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f
  local st = h % 8
  if st == 0 then
    if h ~= 0 then error('not a packed value') end
    return nil, 8, T
  end
  local t = {s = P.STATES[st], u = T, r = 0}
  if not t.s or h >= 128 then error('not a packed value') end
  local xd, i = rvar(v, 8)
  if h % 64 >= 32 then
    local rd
    rd, i = rvar(v, i)
    if rd % 2 == 0 then t.r = T + rd / 2 else t.r = T - (rd + 1) / 2 end
  end
  t.x = (t.r > T and t.r or T) + xd
  if h % 16 >= 8 then
    t.p = byte(v, i)
    i = i + 1
  end
  if h % 32 >= 16 then
    local n
    n, i = rvar(v, i)
    t.d = sub(v, i, i + n - 1)
    i = i + n
  end
  if h >= 64 then
    local n
    n, i = rvar(v, i)
    t.q = sub(v, i, i + n - 1)
    i = i + n
  end
  if i > #v + 1 then error('not a packed value') end
  return t, i, T
end

-- H T [tail] of track t; with t nil, the head of a history-only value whose newest entry is T.
function P.head(t, T)
  if not t then return '\0' .. u48(T) end
  local h = P.SCODE[t.s]
  local r = t.r
  if t.p then h = h + 8 end
  if t.d then h = h + 16 end
  if r > 0 then h = h + 32 end
  if t.q then h = h + 64 end
  local u = t.u
  local out = char(h) .. u48(u) .. varint(t.x - (r > u and r or u))
  if r > 0 then
    local dr = r - u
    out = out .. varint(dr >= 0 and 2 * dr or -2 * dr - 1)
  end
  if t.p then out = out .. char(t.p) end
  if t.d then out = out .. varint(#t.d) .. t.d end
  if t.q then out = out .. varint(#t.q) .. t.q end
  return out
end

-- The value of track t (nil: history only) whose history is e[1..n] ({ms, seq}, oldest
-- first), followed by an older history whose newest entry is (h0, q0) and whose other
-- entries are the bytes rest (as stored after that entry); nil when there is nothing.
function P.value(t, e, n, h0, q0, rest)
  local newest = n > 0 and e[n][1] or h0
  if not (t or newest) then return nil end
  local parts, k, prev = {P.head(t, newest)}, 1, t and t.u or newest
  for i = n, 1, -1 do
    local id = e[i]
    k = k + 1
    parts[k] = varint(prev - id[1]) .. varint(id[2])
    prev = id[1]
  end
  if h0 then parts[k + 1] = varint(prev - h0) .. varint(q0) .. rest end
  return table.concat(parts)
end

function P.entry(v, i)
  local md, seq
  md, i = rvar(v, i)
  seq, i = rvar(v, i)
  return md, seq, i
end

-- Every history entry as {ms, seq}, newest first.
function P.entries(v)
  local _, i, prev = P.decode(v)
  local out, n, len = {}, 0, #v
  while i <= len do
    local md, seq
    md, seq, i = P.entry(v, i)
    prev = prev - md
    n = n + 1
    out[n] = {prev, seq}
  end
  return out
end

-- The time after which the value is dead: its snapshot has expired for good (x + grace)
-- and its history is past retention (newest entry + retention).
function P.expiry(v, grace, retention)
  local t, i, T = P.decode(v)
  local e = t and t.x + grace or 0
  if i <= #v then
    local md = rvar(v, i)
    if T - md + retention > e then e = T - md + retention end
  end
  return e
end

-- The value without its snapshot: its history alone (nil when it has none).
function P.strip(v)
  local _, i, T = P.decode(v)
  if i > #v then return nil end
  local md, j = rvar(v, i)
  return '\0' .. u48(T - md) .. '\0' .. sub(v, j)
end

-- An entry ID '<ms>-<seq>' as two numbers (seq capped at P.SEQ_MAX).
function P.id(id)
  local ms, seq = match(id, '^(%d+)-(%d+)$')
  seq = tonumber(seq)
  if seq > P.SEQ_MAX then seq = P.SEQ_MAX end
  return tonumber(ms), seq
end
