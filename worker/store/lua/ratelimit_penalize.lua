-- After a 429: hold off every worker sharing this API key for a while, never shortening a longer hold.
--
-- KEYS[1]  theoretical arrival time (TAT), integer microseconds since the epoch (see ratelimit_acquire.lua)
-- KEYS[2]  back-off until, integer microseconds since the epoch
-- ARGV[1]  delay in integer microseconds (>= 0)
-- ARGV[2]  emission interval T in integer microseconds
-- ARGV[3]  burst b
--
-- Returns the back-off still in force, in microseconds (>= the requested delay unless already longer).
--
-- Besides the back-off key, the TAT is pushed to until + (b - 1) * T: the first request after the hold is
-- allowed exactly at `until`, and the ones after it follow at the steady rate. Without the push the idle
-- schedule would let a full burst out the moment the hold ends, straight back into the limit.

local delay = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local hold_until = now + delay
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if hold_until > current then
  redis.call('SET', KEYS[2], string.format('%d', hold_until), 'PX', math.ceil(delay / 1000) + 1000)
else
  hold_until = current
end

local min_tat = hold_until + interval * (burst - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if min_tat > tat then
  redis.call('SET', KEYS[1], string.format('%d', min_tat), 'PX', math.ceil((min_tat - now) / 1000) + 1000)
end
return hold_until - now
