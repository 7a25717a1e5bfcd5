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
-- The key's poller takes its tokens with more (one call a status check instead of three):
-- KEYS[3]  its lease, a redis-py Lock: renewed first, as Lock.reacquire does; nothing is taken
--          and {-1, now_us, 0} comes back when another owner holds it
-- ARGV[5]  the lease's owner token; ARGV[6] its time to live in milliseconds
-- KEYS[4]  (optional) the TAT of a second schedule a token is also taken from (the poll share
--          while sends wait; it has no back-off of its own): both schedules grant, or neither is
--          taken from (a share token taken and then refused by KEYS[1] would shrink the share).
-- ARGV[7]  that schedule's emission interval in microseconds; ARGV[8] its burst
-- ARGV[9]  (with KEYS[4]) booking horizon in microseconds: the key's next token is booked if it
--          comes due within this long, even while others queue for it. Senders re-ask for each
--          token as it comes due and the first to ask wins, so a poller that only asked when a
--          token was due lost nearly every race to the sends and its share was not real. A booked
--          token is this request's alone: it goes at now_us + delay_us, as the schedule allows.
--
-- Returns {wait_us, now_us, delay_us}: wait_us = 0 means a token was taken at Redis time now_us, to be
-- used delay_us (>= 0, only ever > 0 for a booking) from then; otherwise nothing was taken from the
-- schedule that refused and wait_us (>= 1) is how long until it could grant one.
--
-- The clock is Redis TIME, never a worker's: workers on different hosts disagree about the time, the one
-- Redis does not. A request is allowed at time t iff t >= TAT - (b - 1) * T; granting it moves the TAT to
-- max(TAT, t) + T. Integers in microseconds stay exact in Lua's doubles (2^53 us is ~285 years).

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

-- Takes a token from the schedule at tat_key unless look_only, booking it if it is due within horizon
-- (0: only one due now). Returns 0 and the delay until the token may be used, or the wait until one
-- could be taken (nothing taken).
local function take(tat_key, interval, burst, look_only, horizon)
  local tat = tonumber(redis.call('GET', tat_key) or '0')
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local allow_at = new_tat - interval * burst
  if allow_at > now + horizon then
    return allow_at - now, 0
  end
  if not look_only then
    -- The key may expire once its TAT has passed: an absent TAT means "idle", which is what it means then.
    redis.call('SET', tat_key, string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  end
  return 0, math.max(allow_at - now, 0)
end

if KEYS[3] then
  if redis.call('GET', KEYS[3]) ~= ARGV[5] then
    return {-1, now, 0}
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
  if KEYS[4] then
    local wait = take(KEYS[4], tonumber(ARGV[7]), tonumber(ARGV[8]), true, 0)
    if wait > 0 then
      return {wait, now, 0}
    end
  end
end

local backoff_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if backoff_until > now then
  return {backoff_until - now, now, 0}
end

local burst = tonumber(ARGV[2]) - tonumber(ARGV[3] or '0')
local horizon = 0
if KEYS[4] then
  horizon = tonumber(ARGV[9] or '0')
end
local wait, delay = take(KEYS[1], tonumber(ARGV[1]), burst, ARGV[4] == '1', horizon)
if wait == 0 and KEYS[4] then
  take(KEYS[4], tonumber(ARGV[7]), tonumber(ARGV[8]), false, 0)
end
return {wait, now, delay}
