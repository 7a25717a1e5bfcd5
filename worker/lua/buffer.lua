-- One job's buffer, sealed batches and per-user ordering, as a single atomic script.
--
-- Every operation that changes which batch a user's change lives in runs here, so a worker killed at
-- any instruction leaves Redis either before or after the operation (DESIGN.md invariant 1). All keys
-- share the job's hash tag, so the script also runs on Redis Cluster.
--
-- KEYS (same order for every op):
--   1 open_users   ZSET  user -> first arrival (ms) in the open batch
--   2 open_recs    HASH  user -> JSON array text of that user's pending records, oldest first
--   3 open_auds    HASH  user -> "|aud|aud|": audiences already pending for the user
--   4 lww          HASH  "aud|user" -> newest accepted event time (ms)
--   5 outstanding  HASH  user -> id of the unfinished batch that carries the user
--   6 waiting      HASH  user -> "aud\trecord\n..." changes held until the user's batch finishes
--   7 sealed       LIST  ids of sealed batches ready to submit (FIFO)
--   8 seq          STR   batch id counter
--   9 status       HASH  counters
--  10 leases       ZSET  batch id -> lease expiry (ms) while a flush owns it
--  11 polls        ZSET  batch id -> time (ms) after which a missing poll is re-driven
-- ARGV[1] op, ARGV[2] now (ms), ARGV[3] batch key prefix ("...:batch:"), ARGV[4] batch size, op args follow.
--
-- Ordering rules (invariants 2 and 3):
--   * a change older than (or as old as) the newest accepted one for the same user+audience is stale;
--   * a user pending in the open batch with a change for another audience is merged into the same
--     batch entry (distinct attributes, so their relative order cannot matter);
--   * a second change for an audience already pending seals the open batch first (early flush);
--   * while a user's batch is unfinished at Attentive, the user's later changes wait, in order, and
--     join the open batch only when that batch completes. Other users are never held back.

local K_OPEN_USERS, K_OPEN_RECS, K_OPEN_AUDS, K_LWW = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_OUTSTANDING, K_WAITING, K_SEALED, K_SEQ = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_STATUS, K_LEASES, K_POLLS = KEYS[9], KEYS[10], KEYS[11]

local op = ARGV[1]
local now = tonumber(ARGV[2])
local batch_prefix = ARGV[3]
local batch_size = tonumber(ARGV[4])

local sealed_now = {}
-- Users in the open batch, read once and kept up to date here (saves a ZCARD per change).
local open_count = redis.call('ZCARD', K_OPEN_USERS)

local function seal()
    local users = redis.call('ZRANGE', K_OPEN_USERS, 0, -1)
    if #users == 0 then
        return
    end
    local bid = redis.call('INCR', K_SEQ)
    local recs = redis.call('HMGET', K_OPEN_RECS, unpack(users))
    local pairs_ = {}
    for i, u in ipairs(users) do
        pairs_[#pairs_ + 1] = u
        pairs_[#pairs_ + 1] = bid
    end
    redis.call('HSET', K_OUTSTANDING, unpack(pairs_))
    redis.call('HSET', batch_prefix .. bid,
        'users', cjson.encode(users),
        'records', '[' .. table.concat(recs, ',') .. ']',
        'n', #users, 'state', 'sealed', 'attempts', 0, 'sealed_at', now)
    redis.call('RPUSH', K_SEALED, bid)
    redis.call('DEL', K_OPEN_USERS, K_OPEN_RECS, K_OPEN_AUDS)
    open_count = 0
    redis.call('HINCRBY', K_STATUS, 'batches_sealed', 1)
    sealed_now[#sealed_now + 1] = bid
end

local function add_to_open(user, aud, rec)
    redis.call('ZADD', K_OPEN_USERS, now, user)
    redis.call('HSET', K_OPEN_RECS, user, '[' .. rec .. ']')
    redis.call('HSET', K_OPEN_AUDS, user, '|' .. aud .. '|')
    open_count = open_count + 1
    if open_count >= batch_size then
        seal()
    end
end

local function merge_into_open(user, aud, rec)
    local recs = redis.call('HGET', K_OPEN_RECS, user)
    redis.call('HSET', K_OPEN_RECS, user, string.sub(recs, 1, -2) .. ',' .. rec .. ']')
    redis.call('HSET', K_OPEN_AUDS, user, redis.call('HGET', K_OPEN_AUDS, user) .. aud .. '|')
end

local function pending_audience(user, aud)
    local auds = redis.call('HGET', K_OPEN_AUDS, user)
    return auds and string.find(auds, '|' .. aud .. '|', 1, true) ~= nil
end

local function append_waiting(user, aud, rec)
    local w = redis.call('HGET', K_WAITING, user) or ''
    redis.call('HSET', K_WAITING, user, w .. aud .. '\t' .. rec .. '\n')
end

-- Returns 'accepted' | 'merged' | 'queued'.
local function place(user, aud, rec)
    local in_open = redis.call('ZSCORE', K_OPEN_USERS, user)
    local has_waiting = redis.call('HEXISTS', K_WAITING, user) == 1
    if in_open then
        if not has_waiting and not pending_audience(user, aud) then
            merge_into_open(user, aud, rec)
            return 'merged'
        end
        seal() -- early flush: the user's pending change goes first
    end
    if has_waiting or redis.call('HEXISTS', K_OUTSTANDING, user) == 1 then
        append_waiting(user, aud, rec)
        return 'queued'
    end
    add_to_open(user, aud, rec)
    return 'accepted'
end

-- Move a freed user's waiting changes into the open batch, oldest first, as far as the rules allow.
local function drain_waiting(user)
    local w = redis.call('HGET', K_WAITING, user)
    if not w then
        return
    end
    redis.call('HDEL', K_WAITING, user)
    local pos = 1
    while pos <= #w do
        local nl = string.find(w, '\n', pos, true)
        local entry = string.sub(w, pos, nl - 1)
        local tab = string.find(entry, '\t', 1, true)
        local aud, rec = string.sub(entry, 1, tab - 1), string.sub(entry, tab + 1)
        local in_open = redis.call('ZSCORE', K_OPEN_USERS, user)
        if redis.call('HEXISTS', K_OUTSTANDING, user) == 1 or (in_open and pending_audience(user, aud)) then
            redis.call('HSET', K_WAITING, user, string.sub(w, pos))
            return
        end
        if in_open then
            merge_into_open(user, aud, rec)
        else
            add_to_open(user, aud, rec)
        end
        pos = nl + 1
    end
end

-- True while the flush holding ``token`` still owns the claimed batch (its lease was not reaped).
local function owns(key, token)
    return redis.call('HGET', key, 'owner') == token and redis.call('HGET', key, 'state') == 'submitting'
end

if op == 'ingest' then
    -- op args: groups of (user, audience, event time ms, record JSON)
    local accepted, merged, queued, stale = 0, 0, 0, 0
    for i = 5, #ARGV, 4 do
        local user, aud, at, rec = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
        local lww_field = aud .. '|' .. user
        local newest = tonumber(redis.call('HGET', K_LWW, lww_field))
        if newest and at <= newest then
            stale = stale + 1
        else
            redis.call('HSET', K_LWW, lww_field, at)
            local r = place(user, aud, rec)
            if r == 'accepted' then accepted = accepted + 1
            elseif r == 'merged' then merged = merged + 1
            else queued = queued + 1 end
        end
    end
    redis.call('HINCRBY', K_STATUS, 'accepted', accepted + merged + queued)
    if stale > 0 then redis.call('HINCRBY', K_STATUS, 'stale', stale) end
    if merged > 0 then redis.call('HINCRBY', K_STATUS, 'merged', merged) end
    if queued > 0 then redis.call('HINCRBY', K_STATUS, 'queued_behind_unfinished', queued) end
    redis.call('HSET', K_STATUS, 'last_ingest_at', now)
    return {accepted, merged, queued, stale, sealed_now}

elseif op == 'seal_due' then
    -- op args: flush interval (ms). Seals the open batch if its oldest entry is that old.
    local oldest = redis.call('ZRANGE', K_OPEN_USERS, 0, 0, 'WITHSCORES')
    if #oldest > 0 and now - tonumber(oldest[2]) >= tonumber(ARGV[5]) then
        seal()
    end
    return sealed_now

elseif op == 'seal_now' then
    seal()
    return sealed_now

elseif op == 'claim' then
    -- op args: owner token, lease (ms). Returns {bid, users, records, attempts, settled} or nil.
    local token, lease = ARGV[5], tonumber(ARGV[6])
    while true do
        local bid = redis.call('LPOP', K_SEALED)
        if not bid then
            return nil
        end
        local key = batch_prefix .. bid
        if redis.call('HGET', key, 'state') == 'sealed' then
            redis.call('HSET', key, 'state', 'submitting', 'owner', token, 'lease_until', now + lease)
            redis.call('ZADD', K_LEASES, now + lease, bid)
            redis.call('HSET', K_STATUS, 'last_claim_at', now)
            local b = redis.call('HMGET', key, 'users', 'records', 'attempts', 'settled')
            return {bid, b[1], b[2], b[3], b[4] or '[]'}
        end
        -- a stale id (batch already completed or re-queued twice) is dropped from the FIFO
    end

elseif op == 'release' then
    -- op args: bid, owner token. Give a claimed batch back unchanged (front of the FIFO).
    local bid = ARGV[5]
    local key = batch_prefix .. bid
    if not owns(key, ARGV[6]) then
        return 0
    end
    redis.call('HSET', key, 'state', 'sealed', 'owner', '')
    redis.call('ZREM', K_LEASES, bid)
    redis.call('LPUSH', K_SEALED, bid)
    return 1

elseif op == 'submitted' then
    -- op args: bid, owner token, Attentive job ids (JSON list), poll deadline (ms), settled users
    -- (JSON list of indices that are finished for good: refused by a 400 and dead-lettered)
    local bid = ARGV[5]
    local key = batch_prefix .. bid
    if not owns(key, ARGV[6]) then
        return 0
    end
    redis.call('HSET', key, 'state', 'submitted', 'owner', '', 'attentive_jobs', ARGV[7], 'submitted_at', now,
        'settled', ARGV[9])
    redis.call('ZREM', K_LEASES, bid)
    redis.call('ZADD', K_POLLS, tonumber(ARGV[8]), bid)
    redis.call('HINCRBY', K_STATUS, 'batches_submitted', 1)
    redis.call('HSET', K_STATUS, 'last_flush_at', now)
    return 1

elseif op == 'poll_due' then
    -- op args: bid, next deadline (ms). Records when the next poll must have happened by.
    if redis.call('EXISTS', batch_prefix .. ARGV[5]) == 1 then
        redis.call('ZADD', K_POLLS, tonumber(ARGV[6]), ARGV[5])
    end
    return 1

elseif op == 'resend' then
    -- op args: bid, reason. Attentive failed or lost the job: submit the same batch again, first.
    local bid = ARGV[5]
    local key = batch_prefix .. bid
    if redis.call('HGET', key, 'state') ~= 'submitted' then
        return 0
    end
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HSET', key, 'state', 'sealed', 'attentive_jobs', '[]', 'last_error', ARGV[6])
    redis.call('ZREM', K_POLLS, bid)
    redis.call('LPUSH', K_SEALED, bid)
    redis.call('HINCRBY', K_STATUS, 'batches_resent', 1)
    return 1

elseif op == 'complete' then
    -- op args: bid, then (status counter, increment) pairs. The batch's data leaves Redis here, and
    -- only here: its users are freed and their waiting changes move into the open batch.
    local bid = ARGV[5]
    local key = batch_prefix .. bid
    local users_json = redis.call('HGET', key, 'users')
    if not users_json then
        return {0, sealed_now}
    end
    for _, user in ipairs(cjson.decode(users_json)) do
        if redis.call('HGET', K_OUTSTANDING, user) == bid then
            redis.call('HDEL', K_OUTSTANDING, user)
            drain_waiting(user)
        end
    end
    redis.call('DEL', key)
    redis.call('ZREM', K_POLLS, bid)
    redis.call('ZREM', K_LEASES, bid)
    for i = 6, #ARGV, 2 do
        redis.call('HINCRBY', K_STATUS, ARGV[i], tonumber(ARGV[i + 1]))
    end
    return {1, sealed_now}

elseif op == 'reap' then
    -- Re-drive work whose owner vanished: expired flush leases go back to the FIFO; batches whose
    -- poll is overdue are returned so the caller dispatches a poll again. op args: poll grace (ms).
    local requeued = 0
    for _, bid in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)) do
        local key = batch_prefix .. bid
        redis.call('ZREM', K_LEASES, bid)
        if redis.call('HGET', key, 'state') == 'submitting' then
            redis.call('HSET', key, 'state', 'sealed', 'owner', '')
            redis.call('LPUSH', K_SEALED, bid)
            requeued = requeued + 1
        end
    end
    local overdue = redis.call('ZRANGEBYSCORE', K_POLLS, '-inf', now)
    for _, bid in ipairs(overdue) do
        redis.call('ZADD', K_POLLS, now + tonumber(ARGV[5]), bid)
    end
    if requeued > 0 then redis.call('HINCRBY', K_STATUS, 'leases_expired', requeued) end
    return {requeued, overdue}
end

return redis.error_reply('unknown buffer op: ' .. tostring(op))
