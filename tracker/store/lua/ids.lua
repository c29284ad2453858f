-- ids.lua: stream entry IDs and Redis's clock, prepended to every script that needs
-- them (see tracker/store/scripts.py), so there is one comparison and one clock.
--
-- Id.lt(a, b)    '<ms>-<seq>' IDs compared as numbers
-- Id.now_ms()    Redis's clock (TIME) in ms, the clock that stamps entry IDs

local Id = {}

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

function Id.lt(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

function Id.now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
