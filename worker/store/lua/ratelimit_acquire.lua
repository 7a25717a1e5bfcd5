-- GCRA (generic cell rate algorithm) acquire for one Attentive API key, shared by every worker.
--
-- KEYS[1]  theoretical arrival time (TAT), integer microseconds since the epoch, Redis clock
-- KEYS[2]  429 back-off: integer microseconds since the epoch until which nobody may send
-- ARGV[1]  emission interval T in integer microseconds (ceil(1e6 / rate), so never above the rate)
-- ARGV[2]  burst b: how many requests may go at once after an idle period (b >= 1)
-- ARGV[3]  reserve r (optional, 0 <= r < b): burst slots this request may not use. With r = b - 2 a
--          request goes only while the schedule runs at most one interval ahead of the clock, i.e.
--          only on capacity nobody is queueing for (low-priority work such as job-status polls).
-- ARGV[4]  '1' to only look: the answer a request would get now, with nothing taken (optional). On
--          Redis TIME of the node holding KEYS, as every grant is (on a Redis Cluster another
--          node's clock may differ).
--
-- Returns {wait_us, now_us}: wait_us = 0 means a token was taken at Redis time now_us; otherwise nothing
-- was taken and wait_us (>= 1) is how long until the next token could be granted.
--
-- The clock is Redis TIME, never a worker's: workers on different hosts disagree about the time, the one
-- Redis does not. A request is allowed at time t iff t >= TAT - (b - 1) * T; granting it moves the TAT to
-- max(TAT, t) + T. Integers in microseconds stay exact in Lua's doubles (2^53 us is ~285 years).

local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2]) - tonumber(ARGV[3] or '0')

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local backoff_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if backoff_until > now then
  return {backoff_until - now, now}
end

local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {allow_at - now, now}
end
if ARGV[4] == '1' then
  return {0, now}
end

-- The key may expire once its TAT has passed: an absent TAT means "idle", which is what it means then.
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {0, now}
