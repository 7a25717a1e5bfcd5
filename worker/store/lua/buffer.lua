-- One job's buffer, sealed batches and per-user ordering, as a single atomic script.
--
-- Every operation that changes which batch a user's change lives in runs here, so a worker killed at
-- any instruction leaves Redis either before or after the operation (DESIGN.md invariant 1).
--
-- Redis Cluster: every key touched here carries the job's hash tag {job:<id>}, so all are on one slot,
-- served by the node the call is routed to by its KEYS. Two kinds cannot be named before the script
-- runs, so they are derived by appending to a name that holds the tag (same tag, same slot): batch
-- keys, ARGV[3] .. bid (a seal takes the next id, a claim or reap finds ids in a list or set), and
-- last-writer-wins buckets, KEYS[4] .. ':' .. n (the op itself may split buckets). Redis 7 runs such
-- a script: one without a shebang may touch any key its node serves (a '#!lua' one, any of its
-- declared keys' slot), and a key served by another node fails the call. The cluster test
-- (tests/integration/test_redis_cluster.py) records every command this script runs on a 3-master
-- cluster (MONITOR) and checks that each key touched is in the slot of the call's declared keys.
-- Moving a job's slot to another node while workers run is not supported (README, Redis Cluster).
--
-- KEYS (same order for every op):
--   1 open_entries HASH  user -> "|aud|aud|<TAB>[record,record]": audiences and records pending in the
--                        open batch (tabs never occur in slugs, and JSON text escapes them)
--   2 open_order   LIST  users of the open batch in arrival order (the order they are sent in)
--   3 open_since   STR   when the open batch got its first user (ms): the interval seal's clock
--   4 lww          HASH  "aud|user" -> newest accepted event time (ms): the layout before compact
--                        last-writer-wins state, read as a fallback and drained while it exists; its
--                        name is also the prefix of the state's buckets (see below)
--   5 outstanding  HASH  user -> id of the unfinished batch that carries the user
--   6 waiting      HASH  user -> "aud\trecord\tid\tid\n..." changes held until the user's batch
--                        finishes, with their identifiers (a line without a second tab has none)
--   7 sealed       LIST  ids of sealed batches ready to submit (FIFO)
--   8 seq          STR   batch id counter
--   9 status       HASH  counters
--  10 leases       ZSET  batch id -> lease expiry (ms) while a flush owns it
--  11 polls        ZSET  batch id -> when its next status check is due (ms), while it is at Attentive
--                        (the key's poller, worker/pipeline/poller.py, checks due ones oldest first)
--  12 open_ids     HASH  "type:value" identifier -> the user of the open batch carrying it (cleared
--                        with every seal), so two users sharing an identifier never share a request
--  13 in_flight    ZSET  batch id -> when it was first sent (ms), until it completes (overdue alerts)
--  14 lww_meta     HASH  the buckets' shape: n (pairs stored), level, split (linear hashing, below),
--                        cursor (HSCAN cursor of the drain of the old layout, KEYS[4])
--  15 check_floors ZSET  batch id -> the earliest its check may be brought forward to (ms): checks
--                        the spread put beyond their age rule (op poll_due), pulled into spare
--                        requests by worker.pipeline.buffer.pull_checks_forward
-- ARGV[1] op, ARGV[2] now (ms), ARGV[3] batch key prefix ("...:batch:"), ARGV[4] batch size, op args follow.
-- A batch is two keys under that prefix: <bid> HASH (users as a JSON list, state, owner, attempts,
-- Attentive jobs, per-job done/failed counts) and <bid>:entries HASH (the open entries, renamed).
--
-- Last-writer-wins state (invariants 3 and 8): per (user, audience), the newest accepted event time
-- (ms), kept in small buckets <KEYS[4]>:<n>, HASH digest -> time, so each stays listpack-encoded:
-- about 33 bytes per pair where one big HASH "aud|user" -> time took 107 to 117 (bench/RESULTS.md).
--   * Bucket keys are derived from the declared KEYS[4] inside the job's hash tag, like batch keys
--     from ARGV[3]: they live on the job's Cluster slot, and `jobs delete` (a SCAN of the tag)
--     removes them.
--   * The digest of a pair comes from Python with each change (worker.store.keys.lww_digest, which
--     states the collision bound): 15 printable characters of 6 bits, 5 from a hash of the user, then
--     10 from a hash of (audience, user). Hashing in Python keeps the work off Redis, the one shared
--     process (and fakeredis has no redis.sha1hex); printable fields keep every key readable as text.
--     The first 5 characters, read as a 30-bit number h, choose the bucket, so a user's audiences
--     share one and a bucket can be split without knowing its users.
--   * Buckets grow with the job by linear hashing, never by rehashing everything: level L and split
--     pointer s (KEYS[14]) make 2^L + s buckets; h lives in bucket h mod 2^L, or h mod 2^(L+1) when
--     that is below s. Before an op reads, buckets are split one at a time (bucket s: the entries with
--     bit L of h set move to s + 2^L; s advances) until the pairs, counting the op's changes as new,
--     are at most LWW_FILL (32) per bucket. A bucket then holds 16 to 64 pairs on average, well under
--     the 128 entries of redis.conf's hash-max-listpack-entries. One that outgrows it anyway (many
--     audiences per user, bad luck) turns into a hashtable, which costs memory, never a wrong answer,
--     and is written anew as a listpack when its turn to split comes.
--   * Times are written as the decimal text Python sent, which listpacks store as 64-bit integers.
--   * Cost: one HGET (or HMGET) and one HSET per bucket an op touches, which at scale is one each
--     per change, instead of one HMGET and one HSET per op on the single HASH.
--   * Jobs written before this layout have the old HASH at KEYS[4]. While it exists every read takes
--     the newer of both layouts, a pair read from it moves into its bucket in the same op, and the
--     Python side drains the rest a few hundred entries per ingest call (op lww_migrate), so an
--     upgrade never accepts a stale change.
--
-- Ordering rules (invariants 2 and 3):
--   * a change older than (or as old as) the newest accepted one for the same user+audience is stale;
--   * a user pending in the open batch with a change for another audience is merged into the same
--     batch entry (distinct attributes, so their relative order cannot matter);
--   * a second change for an audience already pending seals the open batch first (early flush);
--   * a user carrying an identifier (phone, email, ...) that another user of the open batch carries
--     seals the open batch first too: duplicate identifier values in one request can bridge separate
--     users at Attentive (counted as sealed_for_shared_identifier);
--   * while a user's batch is unfinished at Attentive, the user's later changes wait, in order, and
--     join the open batch only when that batch completes. Other users are never held back.
--
-- Speed: Redis runs this for every transition, so per-user state is read in bulk (HMGET) at the start
-- of an op into Lua tables that every later write goes through; a new user then costs two writes
-- (HSET entry, RPUSH order), last-writer-wins times are read and written with one HMGET and one HSET
-- per bucket touched, and the identifier index is written back in one HSET. Identifiers come from
-- Python as "type:value" strings: no record JSON is parsed here.

local K_OPEN, K_ORDER, K_SINCE, K_LWW = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_OUTSTANDING, K_WAITING, K_SEALED, K_SEQ = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_STATUS, K_LEASES, K_POLLS = KEYS[9], KEYS[10], KEYS[11]
local K_IDS, K_INFLIGHT, K_LWW_META, K_FLOORS = KEYS[12], KEYS[13], KEYS[14], KEYS[15]

local op = ARGV[1]
local now = tonumber(ARGV[2])
local batch_prefix = ARGV[3]
local batch_size = tonumber(ARGV[4])

-- Lua's unpack() has a stack limit; commands with many arguments are sent in slices of this many.
local SLICE = 1000

local sealed_now = {}
-- Users in the open batch, read once and kept up to date here.
local open_count = redis.call('LLEN', K_ORDER)

-- Per-op caches of per-user state: nil = not read yet, false = absent. Every write below updates
-- them, so a cached value is never stale within the op. open_all_cached: every open entry is in
-- open_cache (true when the open batch is empty or was just sealed), so misses need no HGET.
local open_cache, out_cache, wait_cache = {}, {}, {}
local open_all_cached = open_count == 0
-- The same for the open batch's identifier index (identifier -> user); empty with the open batch.
local ids_cache = {}
local ids_all_cached = open_count == 0
-- Index entries not written yet (identifier, user, identifier, user, ...): the ingest op (defer_writes)
-- writes them in one HSET at its end, other ops at once. A seal drops them with the index.
local ids_unwritten, ids_unwritten_n = {}, 0
local defer_writes = op == 'ingest' or op == 'redrive'
-- Open entries (user, entry, ...) and users joining the open order not written yet: the ingest op
-- writes them in one HSET and one RPUSH before a seal reads them and at its end (write_open),
-- instead of two commands per change (each Lua-to-Redis call costs about a microsecond of setup).
local open_unwritten, open_unwritten_n, order_unwritten = {}, 0, {}
-- Seals this op made because two users shared an identifier.
local shared_seals = 0

local function hmget(key, fields)
    local out = {}
    for s = 1, #fields, SLICE do
        local part = redis.call('HMGET', key, unpack(fields, s, math.min(s + SLICE - 1, #fields)))
        for j = 1, #part do
            out[#out + 1] = part[j]
        end
    end
    return out
end

local function sliced(cmd, key, args)
    for s = 1, #args, SLICE do
        redis.call(cmd, key, unpack(args, s, math.min(s + SLICE - 1, #args)))
    end
end

-- Read the state of many users at once (SLICE is even, so HSET field/value pairs never split).
local function prefetch(users)
    if not open_all_cached then
        local entries = hmget(K_OPEN, users)
        for j, u in ipairs(users) do
            if open_cache[u] == nil then open_cache[u] = entries[j] end
        end
    end
    local owners = hmget(K_OUTSTANDING, users)
    -- Held changes exist only for a user that is outstanding or in the open batch (append_waiting
    -- and drain_waiting hold a change only then; a seal makes open users outstanding, and complete
    -- drains a user's changes when it frees the user), so the others are known to hold none: in a
    -- backfill of new users this skips the HMGET altogether.
    local busy = {}
    for j, u in ipairs(users) do
        if out_cache[u] == nil then out_cache[u] = owners[j] end
        if wait_cache[u] == nil then
            if out_cache[u] or open_cache[u] then
                busy[#busy + 1] = u
            else
                wait_cache[u] = false
            end
        end
    end
    if #busy > 0 then
        local waits = hmget(K_WAITING, busy)
        for j, u in ipairs(busy) do
            wait_cache[u] = waits[j] and true or false
        end
    end
end

local function open_entry(user)
    local v = open_cache[user]
    if v == nil then
        v = (not open_all_cached and redis.call('HGET', K_OPEN, user)) or false
        open_cache[user] = v
    end
    return v
end

local function outstanding_of(user)
    local v = out_cache[user]
    if v == nil then
        v = redis.call('HGET', K_OUTSTANDING, user)
        out_cache[user] = v
    end
    return v
end

local function has_waiting(user)
    local v = wait_cache[user]
    if v == nil then
        v = redis.call('HEXISTS', K_WAITING, user) == 1
        wait_cache[user] = v
    end
    return v
end

local function write_open()
    if open_unwritten_n > 0 then
        sliced('HSET', K_OPEN, open_unwritten)
        open_unwritten, open_unwritten_n = {}, 0
    end
    if #order_unwritten > 0 then
        sliced('RPUSH', K_ORDER, order_unwritten)
        order_unwritten = {}
    end
end

local function seal()
    if open_count == 0 then
        return
    end
    write_open()
    local users = redis.call('LRANGE', K_ORDER, 0, -1)
    local bid = redis.call('INCR', K_SEQ)
    local owner = tostring(bid)
    -- The open entries become the batch's entries as they are (O(1)): record text never passes
    -- through Lua here, where copying 256 records cost about a millisecond per seal. Renamed
    -- before anything else is written, so a failure here leaves no user owned by a missing batch.
    redis.call('RENAME', K_OPEN, batch_prefix .. bid .. ':entries')
    local pairs_ = {}
    for _, u in ipairs(users) do
        pairs_[#pairs_ + 1] = u
        pairs_[#pairs_ + 1] = owner
        out_cache[u] = owner
    end
    sliced('HSET', K_OUTSTANDING, pairs_)
    redis.call('HSET', batch_prefix .. bid,
        'users', cjson.encode(users), 'n', #users, 'state', 'sealed', 'attempts', 0, 'sealed_at', now)
    redis.call('RPUSH', K_SEALED, bid)
    redis.call('DEL', K_ORDER, K_SINCE, K_IDS)
    open_count = 0
    open_cache = {}
    open_all_cached = true
    ids_cache = {}
    ids_all_cached = true
    ids_unwritten, ids_unwritten_n = {}, 0
    redis.call('HINCRBY', K_STATUS, 'batches_sealed', 1)
    sealed_now[#sealed_now + 1] = bid
end

local function set_entry(user, entry)
    if defer_writes then
        open_unwritten[open_unwritten_n + 1] = user
        open_unwritten[open_unwritten_n + 2] = entry
        open_unwritten_n = open_unwritten_n + 2
    else
        redis.call('HSET', K_OPEN, user, entry)
    end
    open_cache[user] = entry
end

-- A change's identifiers ("type:value" strings) arrive joined by tabs; split_ids appends them to a
-- list, and the helpers below take a change's identifiers as the slice t[i..j] of such a list.
local function split_ids(s, from, t, n)
    local len = #s
    while from <= len do
        local to = string.find(s, '\t', from, true) or len + 1
        n = n + 1
        t[n] = string.sub(s, from, to - 1)
        from = to + 1
    end
    return n
end

local function id_owner(id)
    local v = ids_cache[id]
    if v == nil then
        v = (not ids_all_cached and redis.call('HGET', K_IDS, id)) or false
        ids_cache[id] = v
    end
    return v
end

-- Whether another user of the open batch carries one of the identifiers t[i..j].
local function shares_identifier(user, t, i, j)
    if open_count == 0 then
        return false
    end
    for x = i, j do
        local owner = id_owner(t[x])
        if owner and owner ~= user then
            return true
        end
    end
    return false
end

local function index_identifiers(user, t, i, j)
    if defer_writes then
        for x = i, j do
            local id = t[x]
            if ids_cache[id] ~= user then
                ids_cache[id] = user
                ids_unwritten[ids_unwritten_n + 1] = id
                ids_unwritten[ids_unwritten_n + 2] = user
                ids_unwritten_n = ids_unwritten_n + 2
            end
        end
        return
    end
    local pairs_ = {}
    for x = i, j do
        pairs_[#pairs_ + 1] = t[x]
        pairs_[#pairs_ + 1] = user
        ids_cache[t[x]] = user
    end
    sliced('HSET', K_IDS, pairs_)
end

local function add_to_open(user, aud, rec, t, i, j)
    if open_count == 0 then
        redis.call('SET', K_SINCE, now)
    end
    set_entry(user, '|' .. aud .. '|\t[' .. rec .. ']')
    if defer_writes then
        order_unwritten[#order_unwritten + 1] = user
    else
        redis.call('RPUSH', K_ORDER, user)
    end
    open_count = open_count + 1
    index_identifiers(user, t, i, j)
    if open_count >= batch_size then
        seal()
    end
end

local function merge_into_open(user, aud, rec, entry, t, i, j)
    local tab = string.find(entry, '\t', 1, true)
    set_entry(user, string.sub(entry, 1, tab - 1) .. aud .. '|\t' .. string.sub(entry, tab + 1, -2) .. ',' .. rec .. ']')
    index_identifiers(user, t, i, j)
end

-- Seal the open batch because a user about to join (or grow) it shares an identifier with another.
local function seal_shared()
    seal()
    shared_seals = shared_seals + 1
    redis.call('HINCRBY', K_STATUS, 'sealed_for_shared_identifier', 1)
end

-- Whether ``entry`` (an open entry) already holds a change for ``aud``.
local function pending_audience(entry, aud)
    local auds = string.sub(entry, 1, string.find(entry, '\t', 1, true) - 1)
    return string.find(auds, '|' .. aud .. '|', 1, true) ~= nil
end

local function append_waiting(user, aud, rec, t, i, j)
    local w = redis.call('HGET', K_WAITING, user) or ''
    if w ~= '' then
        -- Held changes coalesce (invariant 2): ingest accepts only changes newer than every earlier
        -- one for the user and audience, so this one replaces a held change for the same audience.
        -- A held user then keeps at most one change per audience, and reaches its final state in one
        -- more Attentive round trip however often it flipped meanwhile. Other audiences keep theirs
        -- (distinct attributes: their relative order cannot matter).
        local kept, pos, prefix, dropped = {}, 1, aud .. '\t', 0
        while pos <= #w do
            local nl = string.find(w, '\n', pos, true)
            if string.sub(w, pos, pos + #prefix - 1) == prefix then
                dropped = dropped + 1
            else
                kept[#kept + 1] = string.sub(w, pos, nl)
            end
            pos = nl + 1
        end
        if dropped > 0 then
            w = table.concat(kept)
            redis.call('HINCRBY', K_STATUS, 'coalesced_while_held', dropped)
        end
    end
    redis.call('HSET', K_WAITING, user, w .. aud .. '\t' .. rec .. '\t' .. table.concat(t, '\t', i, j) .. '\n')
    wait_cache[user] = true
end

-- Returns 'accepted' | 'merged' | 'queued'.
-- ``t[i..j]``: the change's identifiers.
local function place(user, aud, rec, t, i, j)
    local entry = open_entry(user)
    local waiting = has_waiting(user)
    if entry then
        if waiting or pending_audience(entry, aud) then
            seal() -- early flush: the user's pending change goes first
        elseif shares_identifier(user, t, i, j) then
            seal_shared() -- the pending entry goes first, this change waits for it as above
        else
            merge_into_open(user, aud, rec, entry, t, i, j)
            return 'merged'
        end
    end
    if waiting or outstanding_of(user) then
        append_waiting(user, aud, rec, t, i, j)
        return 'queued'
    end
    if shares_identifier(user, t, i, j) then
        seal_shared()
    end
    add_to_open(user, aud, rec, t, i, j)
    return 'accepted'
end

-- Move a freed user's waiting changes ``w`` into the open batch, oldest first, as far as the rules allow.
local function drain_waiting(user, w)
    redis.call('HDEL', K_WAITING, user)
    wait_cache[user] = false
    local pos = 1
    while pos <= #w do
        local nl = string.find(w, '\n', pos, true)
        local line = string.sub(w, pos, nl - 1)
        local tab = string.find(line, '\t', 1, true)
        local tab2 = string.find(line, '\t', tab + 1, true) -- record JSON never holds a raw tab
        local aud, rec, ids = string.sub(line, 1, tab - 1), string.sub(line, tab + 1), {}
        if tab2 then -- identifiers follow (a line written before they were kept has none)
            rec = string.sub(line, tab + 1, tab2 - 1)
            split_ids(line, tab2 + 1, ids, 0)
        end
        local entry = open_entry(user)
        if not outstanding_of(user) and not (entry and pending_audience(entry, aud))
            and shares_identifier(user, ids, 1, #ids) then
            seal_shared()
            entry = false
        end
        if outstanding_of(user) or (entry and pending_audience(entry, aud)) then
            redis.call('HSET', K_WAITING, user, string.sub(w, pos))
            wait_cache[user] = true
            return
        end
        if entry then
            merge_into_open(user, aud, rec, entry, ids, 1, #ids)
        else
            add_to_open(user, aud, rec, ids, 1, #ids)
        end
        pos = nl + 1
    end
end

-- True while the flush holding ``token`` still owns the claimed batch (its lease was not reaped).
local function owns(key, token)
    return redis.call('HGET', key, 'owner') == token and redis.call('HGET', key, 'state') == 'submitting'
end

-- Every request Attentive accepted for a batch (or may have: an "unknown:" entry stands for a send
-- whose answer never came) is recorded in its 'attentive_jobs' JSON list, and stays there until the
-- batch completes: a batch completes only when each of them has finished ('done:<id>' or
-- 'ended:<id>'), so a user's next change never races an older Attentive job carrying the user.
local function unfinished_jobs(key)
    local raw = redis.call('HGET', key, 'attentive_jobs')
    local out = {}
    if not raw then
        return out
    end
    for _, j in ipairs(cjson.decode(raw)) do
        if redis.call('HEXISTS', key, 'done:' .. j.id) == 0 and redis.call('HEXISTS', key, 'ended:' .. j.id) == 0 then
            out[#out + 1] = j
        end
    end
    return out
end

-- Indices of users carried by unfinished jobs Attentive certainly accepted (a JSON list): a re-send
-- leaves them out, the poll follows their jobs.
local function carried_json(key)
    local idx = {}
    for _, j in ipairs(unfinished_jobs(key)) do
        if string.sub(j.id, 1, 8) ~= 'unknown:' then
            for _, i in ipairs(j.idx) do
                idx[#idx + 1] = i
            end
        end
    end
    if #idx == 0 then
        return '[]'
    end
    return cjson.encode(idx)
end

-- --- last-writer-wins state (see the header) ------------------------------------------------------
-- Pairs per bucket on average before the next split (a bucket holds LWW_FILL/2 to 2*LWW_FILL).
local LWW_FILL = 32
-- redis.conf's hash-max-listpack-entries (the compiled-in default is 512).
local LWW_LISTPACK = 128
local LWW_PREFIX = K_LWW .. ':'
-- The buckets' shape (lww_open), and what lww_read found for lww_write: the buckets read, in order,
-- their key names, and per bucket its first digest position (lww_head) and the next one in the same
-- bucket (lww_next). Every digest here runs through Lua once per change, so the code is plain loops.
local lww_n, lww_level, lww_split, lww_legacy
local lww_n_read = 0 -- lww_n as read, so lww_write records it only when it changed
local lww_digests, lww_order, lww_keys, lww_head, lww_next = {}, {}, {}, {}, {}
local lww_carry, lww_legacy_found = {}, {}

-- Split bucket lww_split: entries whose user hash has bit ``level`` set move to the new bucket
-- lww_split + 2^level. The hash is the digest's first 5 characters, 6 bits each (byte - 0x30), the
-- last one lowest: bit L is in character 5 - floor(L / 6).
local function lww_split_one()
    local size = 2 ^ lww_level
    local from = LWW_PREFIX .. lww_split
    if lww_level < 30 then
        local pos, unit = 5 - math.floor(lww_level / 6), 2 ^ (lww_level % 6)
        local all = redis.call('HGETALL', from)
        -- A bucket that outgrew a listpack became a hashtable, which Redis never turns back: what
        -- stays is written anew, so it is a listpack again.
        local rewrite = #all > 2 * LWW_LISTPACK
        local moved, kept, gone = {}, {}, {}
        for x = 1, #all, 2 do
            local f = all[x]
            if math.floor((string.byte(f, pos) - 48) / unit) % 2 == 1 then
                moved[#moved + 1] = f
                moved[#moved + 1] = all[x + 1]
                gone[#gone + 1] = f
            elseif rewrite then
                kept[#kept + 1] = f
                kept[#kept + 1] = all[x + 1]
            end
        end
        sliced('HSET', LWW_PREFIX .. (lww_split + size), moved)
        if rewrite then
            redis.call('DEL', from)
            sliced('HSET', from, kept)
        else
            sliced('HDEL', from, gone)
        end
    end
    lww_split = lww_split + 1
    if lww_split == size then
        lww_level, lww_split = lww_level + 1, 0
    end
end

-- Read the buckets' shape; split first if ``coming`` new pairs could outgrow them, so no bucket
-- passes its size before the next op looks (and an op never reads a bucket it then splits).
local function lww_open(coming)
    local m = redis.call('HMGET', K_LWW_META, 'n', 'level', 'split')
    lww_n, lww_level, lww_split = tonumber(m[1]) or 0, tonumber(m[2]) or 0, tonumber(m[3]) or 0
    lww_legacy = redis.call('EXISTS', K_LWW) == 1
    local split = false
    while lww_n + coming > LWW_FILL * (2 ^ lww_level + lww_split) do
        lww_split_one()
        split = true
    end
    if split then -- recorded at once: entries have moved, whatever the op does next
        redis.call('HSET', K_LWW_META, 'level', lww_level, 'split', lww_split)
    end
    lww_n_read = lww_n
end

-- Newest accepted time (a number, or nil) of each pair in ``digests`` (one HGET or HMGET per bucket).
-- ``legacy_name(k)`` gives the k-th pair's field in the old HASH ("aud|user"), read while it exists:
-- its newer times are carried into the buckets by lww_write(), which deletes the fields read.
local function lww_read(digests, legacy_name)
    local size, split = 2 ^ lww_level, lww_split
    local order, keys, head, nxt = lww_order, lww_keys, lww_head, lww_next
    lww_digests = digests
    local byte = string.byte
    for k = #digests, 1, -1 do -- backwards, so each bucket's chain runs in digest order
        local c1, c2, c3, c4, c5 = byte(digests[k], 1, 5) -- the user hash
        local h = ((((c1 - 48) * 64 + c2 - 48) * 64 + c3 - 48) * 64 + c4 - 48) * 64 + c5 - 48
        local b = h % size
        if b < split then
            b = h % (size * 2)
        end
        local first = head[b]
        if not first then
            order[#order + 1] = b
        end
        nxt[k] = first or false
        head[b] = k
    end
    local stored = {}
    for j, b in ipairs(order) do
        local key = LWW_PREFIX .. b
        keys[j] = key
        local k = head[b]
        if not nxt[k] then
            stored[k] = tonumber(redis.call('HGET', key, digests[k]))
        else
            local ks, fields = {}, {}
            while k do
                ks[#ks + 1] = k
                fields[#fields + 1] = digests[k]
                k = nxt[k]
            end
            local got = hmget(key, fields)
            for x, kk in ipairs(ks) do
                stored[kk] = tonumber(got[x])
            end
        end
    end
    if lww_legacy then
        local names = {}
        for k = 1, #digests do
            names[k] = legacy_name(k)
        end
        local old = hmget(K_LWW, names)
        for k, d in ipairs(digests) do
            local t = tonumber(old[k])
            if t then
                lww_legacy_found[#lww_legacy_found + 1] = names[k]
                if not stored[k] or t > stored[k] then
                    stored[k] = t
                    local c = lww_carry[d]
                    if not c or t > tonumber(c) then
                        lww_carry[d] = old[k]
                    end
                end
            end
        end
    end
    return stored
end

-- Write ``newest`` (digest -> time as decimal text, newer than what lww_read found) and the old
-- layout's carried times into the buckets lww_read read, one HSET per bucket; delete the old fields
-- read; record the pairs stored if that changed.
local function lww_write(newest)
    for d, t in pairs(lww_carry) do
        if not newest[d] then
            newest[d] = t
        end
    end
    local digests, head, nxt = lww_digests, lww_head, lww_next
    for j, b in ipairs(lww_order) do
        local k = head[b]
        if not nxt[k] then
            local t = newest[digests[k]]
            if t then
                lww_n = lww_n + redis.call('HSET', lww_keys[j], digests[k], t)
            end
        else
            local args = {}
            while k do
                local d = digests[k]
                local t = newest[d]
                if t then
                    args[#args + 1] = d
                    args[#args + 1] = t
                    newest[d] = nil -- once per bucket, however often the pair came
                end
                k = nxt[k]
            end
            for s = 1, #args, SLICE do
                local e = math.min(s + SLICE - 1, #args)
                lww_n = lww_n + redis.call('HSET', lww_keys[j], unpack(args, s, e))
            end
        end
    end
    sliced('HDEL', K_LWW, lww_legacy_found)
    if lww_n ~= lww_n_read then
        redis.call('HSET', K_LWW_META, 'n', lww_n)
    end
end

if op == 'ingest' or op == 'redrive' then
    -- op args: groups of (user, audience, event time ms, record JSON, identifiers: "type:value"
    -- strings joined by tabs, '' for none, last-writer-wins digest of (user, audience))
    -- redrive: dead-lettered changes sent again (worker/pipeline/redrive.py), each with the time
    -- op 'stamp' read when it was dead-lettered. One still as new as the newest accepted change of
    -- its pair is placed like a new one; one older is superseded (a newer change was accepted since).
    local redrive = op == 'redrive'
    local accepted, merged, queued, stale = 0, 0, 0, 0
    local fields, users, seen = {}, {}, {}
    local idt, id_from, id_to, n = {}, {}, {}, 0 -- every change's identifiers, and its slice of them
    for i = 5, #ARGV, 6 do
        local user = ARGV[i]
        local k = #fields + 1
        fields[k] = ARGV[i + 5]
        if not seen[user] then
            seen[user] = true
            users[#users + 1] = user
        end
        id_from[k] = n + 1
        n = split_ids(ARGV[i + 4], 1, idt, n)
        id_to[k] = n
    end
    lww_open(#fields)
    local stored = lww_read(fields, function(k)
        return ARGV[6 * k] .. '|' .. ARGV[6 * k - 1]
    end)
    prefetch(users)
    -- Read the index for the changes that may join before the open batch fills up (a seal empties it;
    -- a later change still needing it, after stale or queued ones, reads it one HGET at a time).
    local room = math.min(batch_size - open_count, #fields)
    local upto = (not ids_all_cached and room > 0) and id_to[room] or 0
    for s = 1, upto, SLICE do
        local e = math.min(s + SLICE - 1, upto)
        local owners = redis.call('HMGET', K_IDS, unpack(idt, s, e))
        for x = s, e do
            ids_cache[idt[x]] = owners[x - s + 1] or false
        end
    end
    local newest, newest_text = {}, {} -- lww digest -> newest time accepted by this op, and its text
    for k, lww_field in ipairs(fields) do
        local i = 6 * k - 1
        local at = tonumber(ARGV[i + 2])
        local known = newest[lww_field] or stored[k]
        if known and (at < known or (at == known and (not redrive or newest[lww_field]))) then
            stale = stale + 1
        else
            newest[lww_field] = at
            newest_text[lww_field] = ARGV[i + 2]
            local r = place(ARGV[i], ARGV[i + 1], ARGV[i + 3], idt, id_from[k], id_to[k])
            if r == 'accepted' then accepted = accepted + 1
            elseif r == 'merged' then merged = merged + 1
            else queued = queued + 1 end
        end
    end
    lww_write(newest_text)
    write_open()
    sliced('HSET', K_IDS, ids_unwritten)
    if redrive then
        redis.call('HINCRBY', K_STATUS, 'redriven', accepted + merged + queued)
        if stale > 0 then redis.call('HINCRBY', K_STATUS, 'redrive_superseded', stale) end
        return {accepted, merged, queued, stale, sealed_now, shared_seals, lww_legacy and 1 or 0}
    end
    redis.call('HINCRBY', K_STATUS, 'accepted', accepted + merged + queued)
    if stale > 0 then redis.call('HINCRBY', K_STATUS, 'stale', stale) end
    if merged > 0 then redis.call('HINCRBY', K_STATUS, 'merged', merged) end
    if queued > 0 then redis.call('HINCRBY', K_STATUS, 'queued_behind_unfinished', queued) end
    redis.call('HSET', K_STATUS, 'last_ingest_at', now)
    return {accepted, merged, queued, stale, sealed_now, shared_seals, lww_legacy and 1 or 0}

elseif op == 'seal_due' then
    -- op args: flush interval (ms). Seals the open batch if its oldest entry is that old.
    local since = tonumber(redis.call('GET', K_SINCE))
    if open_count > 0 and since and now - since >= tonumber(ARGV[5]) then
        seal()
    end
    return sealed_now

elseif op == 'seal_now' then
    seal()
    return sealed_now

elseif op == 'claim' then
    -- op args: owner token, lease (ms), and optionally the uncertain-send hold's floor and slack (ms).
    -- Returns {bid, users, attempts, settled, sealed batches left, indices carried by unfinished
    -- accepted jobs, the pre-recorded send's id ('' for none), its hold (ms)} or nil. The caller
    -- reads the entries itself (they never change until the batch completes): passed through Lua,
    -- 256 records cost about 300 us of Redis CPU per claim in string conversions alone.
    -- With a hold floor, the send about to go out (every user neither settled nor carried) is
    -- recorded here as an "unknown:" job held max(floor, 2 x the longest Attentive job seen) + slack
    -- from now (the slack covers the wait for a rate-limit token before the request leaves), the
    -- step 'accepted' would otherwise take as a call of its own before each request: the flush
    -- replaces it with Attentive's answer, and a worker dying in between leaves the users held.
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
            local b = redis.call('HMGET', key, 'users', 'attempts', 'settled', 'n')
            local carried = carried_json(key)
            local unknown, hold = '', 0
            if ARGV[7] then
                local n = tonumber(b[4]) or #cjson.decode(b[1])
                local skip = {}
                for _, i in ipairs(cjson.decode(b[3] or '[]')) do skip[i] = true end
                for _, i in ipairs(cjson.decode(carried)) do skip[i] = true end
                local idx = {}
                for i = 0, n - 1 do
                    if not skip[i] then idx[#idx + 1] = i end
                end
                local longest = tonumber(redis.call('HGET', K_STATUS, 'longest_attentive_job_ms')) or 0
                hold = math.max(tonumber(ARGV[7]), 2 * longest)
                if #idx > 0 then
                    unknown = 'unknown:' .. token
                    local job = '{"id":"' .. unknown .. '","idx":[' .. table.concat(idx, ',') .. '],"until":'
                        .. string.format('%d', now + hold + tonumber(ARGV[8])) .. '}'
                    local raw = redis.call('HGET', key, 'attentive_jobs')
                    if not raw or raw == '[]' then
                        raw = '[' .. job .. ']'
                    else
                        raw = string.sub(raw, 1, -2) .. ',' .. job .. ']'
                    end
                    redis.call('HSET', key, 'attentive_jobs', raw)
                end
            end
            return {bid, b[1], b[2], b[3] or '[]', redis.call('LLEN', K_SEALED), carried, unknown, hold}
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

elseif op == 'accepted' then
    -- op args: bid, one job as JSON ({"id", "idx": [user indices]}, plus "until" (ms) for an
    -- "unknown:" send) or '' for none, and the id of a recorded job it replaces ('' for none).
    -- Recorded the moment Attentive accepts a request, before anything else can fail, and whoever
    -- owns the batch: a job Attentive runs is polled however the send ended. Every request is
    -- recorded as an "unknown:" entry before it goes out and replaced by its answer, so a worker
    -- that dies in between leaves the users held, never an untracked Attentive job.
    local key = batch_prefix .. ARGV[5]
    if redis.call('HEXISTS', key, 'users') == 0 then
        return 0
    end
    local raw = redis.call('HGET', key, 'attentive_jobs')
    local replaces = ARGV[7] or ''
    if replaces ~= '' and raw and raw ~= '[]' then
        local kept = {}
        for _, j in ipairs(cjson.decode(raw)) do
            if j.id ~= replaces then
                kept[#kept + 1] = cjson.encode(j)
            end
        end
        raw = '[' .. table.concat(kept, ',') .. ']'
    end
    if ARGV[6] ~= '' then
        if not raw or raw == '[]' then
            raw = '[' .. ARGV[6] .. ']'
        else
            raw = string.sub(raw, 1, -2) .. ',' .. ARGV[6] .. ']'
        end
    end
    redis.call('HSET', key, 'attentive_jobs', raw or '[]')
    return 1

elseif op == 'ended' then
    -- op args: bid, job id, reason, '1' if it counts as a failed send. A recorded job finished
    -- without delivering (FAILED, CANCELLED, lost, or an unanswered send whose hold passed). Once per
    -- job, so twin polls never count a failure twice.
    local key = batch_prefix .. ARGV[5]
    if redis.call('HEXISTS', key, 'users') == 0 or redis.call('HSETNX', key, 'ended:' .. ARGV[6], ARGV[7]) == 0 then
        return 0
    end
    redis.call('HSET', key, 'last_error', ARGV[7])
    if ARGV[8] == '1' then
        redis.call('HINCRBY', key, 'attempts', 1)
    end
    return 1

elseif op == 'submitted' then
    -- op args: bid, owner token, first status check due (ms), settled users (JSON list of indices
    -- that are finished for good: refused by a 400 and dead-lettered). The jobs were recorded by
    -- 'accepted'.
    local bid = ARGV[5]
    local key = batch_prefix .. bid
    if not owns(key, ARGV[6]) then
        return 0
    end
    redis.call('HSET', key, 'state', 'submitted', 'owner', '', 'submitted_at', now, 'settled', ARGV[8])
    redis.call('ZREM', K_FLOORS, bid) -- a floor left from an earlier send is not this one's
    redis.call('ZREM', K_LEASES, bid)
    redis.call('ZADD', K_POLLS, tonumber(ARGV[7]), bid)
    redis.call('ZADD', K_INFLIGHT, 'NX', now, bid)
    redis.call('HINCRBY', K_STATUS, 'batches_submitted', 1)
    redis.call('HSET', K_STATUS, 'last_flush_at', now, 'consecutive_429', 0, 'consecutive_errors', 0)
    return 1

elseif op == 'poll_due' then
    -- op args: bid, when its next status check is due (ms), optionally the earliest it may be
    -- brought forward to (ms; kept in K_FLOORS only when earlier than the due time, read by the
    -- poller when the key has spare requests: worker.pipeline.buffer.pull_checks_forward).
    -- Without one, the check stays where it is put. Only while the batch is at Attentive: one sent
    -- again or completed meanwhile is dropped from the schedule instead.
    local key = batch_prefix .. ARGV[5]
    if redis.call('HGET', key, 'state') == 'submitted' then
        local due = tonumber(ARGV[6])
        redis.call('ZADD', K_POLLS, due, ARGV[5])
        if ARGV[7] and tonumber(ARGV[7]) < due then
            redis.call('ZADD', K_FLOORS, tonumber(ARGV[7]), ARGV[5])
        else
            redis.call('ZREM', K_FLOORS, ARGV[5])
        end
        return 1
    end
    redis.call('ZREM', K_POLLS, ARGV[5])
    redis.call('ZREM', K_FLOORS, ARGV[5])
    return 0

elseif op == 'resend' then
    -- op args: bid, reason. Users are still open after every recorded job finished (a job failed or
    -- was lost, a send's answer never came, a split stopped half way): send the batch again, first.
    local bid = ARGV[5]
    local key = batch_prefix .. bid
    if redis.call('HGET', key, 'state') ~= 'submitted' then
        return 0
    end
    -- The recorded jobs stay: every one has finished (the poll resends only then), and their marks
    -- tell the next send which users are settled already.
    redis.call('HSET', key, 'state', 'sealed', 'last_error', ARGV[6])
    redis.call('ZREM', K_POLLS, bid)
    redis.call('ZREM', K_FLOORS, bid)
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
    local users = cjson.decode(users_json)
    local owners = hmget(K_OUTSTANDING, users)
    local freed = {}
    for i, user in ipairs(users) do
        if owners[i] == bid then
            freed[#freed + 1] = user
            out_cache[user] = false
        end
    end
    -- Free them all first: draining may seal a batch that makes some of them outstanding again.
    sliced('HDEL', K_OUTSTANDING, freed)
    local waits = hmget(K_WAITING, freed)
    for i, user in ipairs(freed) do
        if waits[i] then
            drain_waiting(user, waits[i])
        end
    end
    redis.call('DEL', key, key .. ':entries')
    redis.call('ZREM', K_POLLS, bid)
    redis.call('ZREM', K_FLOORS, bid)
    redis.call('ZREM', K_LEASES, bid)
    redis.call('ZREM', K_INFLIGHT, bid)
    for i = 6, #ARGV, 2 do
        redis.call('HINCRBY', K_STATUS, ARGV[i], tonumber(ARGV[i + 1]))
    end
    return {1, sealed_now}

elseif op == 'reap' then
    -- Re-drive work whose owner vanished: expired flush leases go back to the FIFO (or to the
    -- poller, due at once, when Attentive accepted part of the batch). Returns how many were
    -- re-queued. Polls need no re-drive: their schedule lives here, not in broker messages.
    local requeued = 0
    for _, bid in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)) do
        local key = batch_prefix .. bid
        redis.call('ZREM', K_LEASES, bid)
        if redis.call('HGET', key, 'state') == 'submitting' then
            if carried_json(key) ~= '[]' then
                -- Its flush died after Attentive accepted part of it: poll what was accepted now (the
                -- poll resends the rest once those jobs finish), never re-send it alongside them.
                redis.call('HSET', key, 'state', 'submitted', 'owner', '')
                redis.call('ZADD', K_POLLS, now, bid)
            else
                -- Nothing certainly accepted. An "unknown:" entry (its flush died with a request
                -- out) stays: the users go again now, and the batch completes only after its hold.
                redis.call('HSET', key, 'state', 'sealed', 'owner', '')
                redis.call('LPUSH', K_SEALED, bid)
                requeued = requeued + 1
            end
        end
    end
    if requeued > 0 then redis.call('HINCRBY', K_STATUS, 'leases_expired', requeued) end
    return requeued

elseif op == 'lww_get' or op == 'stamp' then
    -- op args: groups of (user, audience, digest). Each pair's newest accepted event time (ms) as
    -- text, or false. Read-only: the old layout's times are read, not moved.
    -- stamp: the pairs of changes about to be dead-lettered from a batch that still carries their
    -- users. While the batch is unfinished every newer change of its users is held (KEYS[6]), so
    -- the time read is the dead-lettered change's own; false where a newer change for the audience
    -- is held (it will deliver the final value). A later 'redrive' re-sends a change only while
    -- its pair's time is still the stamped one.
    lww_open(0)
    local digests = {}
    for i = 5, #ARGV, 3 do
        digests[#digests + 1] = ARGV[i + 2]
    end
    local stored = lww_read(digests, function(k)
        return ARGV[3 * k + 3] .. '|' .. ARGV[3 * k + 2]
    end)
    local out, held_of = {}, {}
    for k = 1, #digests do
        local t = stored[k] and string.format('%d', stored[k]) or false
        if t and op == 'stamp' then
            local user, aud = ARGV[3 * k + 2], ARGV[3 * k + 3]
            local w = held_of[user]
            if w == nil then
                w = redis.call('HGET', K_WAITING, user) or ''
                held_of[user] = w
            end
            if string.sub(w, 1, #aud + 1) == aud .. '\t' or string.find(w, '\n' .. aud .. '\t', 1, true) then
                t = false
            end
        end
        out[k] = t
    end
    return out

elseif op == 'lww_migrate' then
    -- op args: the old HASH's next HSCAN cursor, then groups of (user, audience, digest) of fields
    -- the caller scanned from it. Moves their times (as they are now) into the buckets, keeping the
    -- newer where both hold one. Returns the old HASH's fields left (0 once it is gone).
    lww_open((#ARGV - 5) / 3)
    if not lww_legacy then
        redis.call('HDEL', K_LWW_META, 'cursor')
        return 0
    end
    local digests = {}
    for i = 6, #ARGV, 3 do
        digests[#digests + 1] = ARGV[i + 2]
    end
    lww_read(digests, function(k)
        return ARGV[3 * k + 4] .. '|' .. ARGV[3 * k + 3]
    end)
    lww_write({})
    local left = redis.call('HLEN', K_LWW)
    if left == 0 or ARGV[5] == '0' then
        redis.call('HDEL', K_LWW_META, 'cursor')
    else
        redis.call('HSET', K_LWW_META, 'cursor', ARGV[5])
    end
    return left
end

return redis.error_reply('unknown buffer op: ' .. tostring(op))
