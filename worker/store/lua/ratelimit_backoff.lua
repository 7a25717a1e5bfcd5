-- Microseconds of 429 back-off still in force for one API key, measured on the Redis clock.
--
-- KEYS[1]  back-off until, integer microseconds since the epoch (see ratelimit_penalize.lua)

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local hold_until = tonumber(redis.call('GET', KEYS[1]) or '0')
if hold_until > now then
  return hold_until - now
end
return 0
