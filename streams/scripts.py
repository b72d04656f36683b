"""Lua scripts that read and apply one batch, one call per hash-tag bucket.

Every script touches only keys of one bucket (declared in KEYS), so the layout works on Redis
Cluster. Write scripts check the bucket's offset guard for the source partition, apply only records
above it and advance it: a replayed message has no effect. Weights travel as strings produced by
Python's ``repr`` and go to Redis verbatim, so Lua's number formatting never rounds them.
"""

# KEYS: bucket guard, then per user: state, recent, items, aff
# ARGV: partition, ttl_s, recent_cap, n_users, then per user: n_events, then per event:
#       offset, type, item ('' for none), ts, item_weight ('' for none), n_aff, (member, weight) * n_aff
USER_APPLY = """
local gf = ARGV[1]
local guard = tonumber(redis.call('HGET', KEYS[1], gf) or '-1')
local ttl = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local i = 5
local applied = 0
local max_off = guard
local max_off_s = nil
for u = 0, tonumber(ARGV[4]) - 1 do
  local ks, kr, ki, ka = KEYS[2 + 4 * u], KEYS[3 + 4 * u], KEYS[4 + 4 * u], KEYS[5 + 4 * u]
  local n = tonumber(ARGV[i])
  i = i + 1
  local touched = false
  local last_seen, last_seen_s = -1, nil
  for _ = 1, n do
    local off = tonumber(ARGV[i])
    local naff = tonumber(ARGV[i + 5])
    local j = i + 6
    if off > guard then
      touched = true
      redis.call('HINCRBY', ks, 'n:' .. ARGV[i + 1], 1)
      local item = ARGV[i + 2]
      if item ~= '' then
        redis.call('LREM', kr, 0, item)
        redis.call('LPUSH', kr, item)
        if ARGV[i + 4] ~= '' then redis.call('ZINCRBY', ki, ARGV[i + 4], item) end
      end
      for a = 0, naff - 1 do
        redis.call('ZINCRBY', ka, ARGV[j + 2 * a + 1], ARGV[j + 2 * a])
      end
      local ts = tonumber(ARGV[i + 3])
      if ts > last_seen then last_seen, last_seen_s = ts, ARGV[i + 3] end
      if off > max_off then max_off, max_off_s = off, ARGV[i] end
      applied = applied + 1
    end
    i = j + 2 * naff
  end
  if touched then
    redis.call('LTRIM', kr, 0, cap - 1)
    local prev = tonumber(redis.call('HGET', ks, 'last_seen') or '-1')
    if last_seen > prev then redis.call('HSET', ks, 'last_seen', last_seen_s) end
    redis.call('EXPIRE', ks, ttl)
    redis.call('EXPIRE', kr, ttl)
    redis.call('EXPIRE', ki, ttl)
    redis.call('EXPIRE', ka, ttl)
  end
end
if max_off_s then redis.call('HSET', KEYS[1], gf, max_off_s) end
return applied
"""

# Guarded sorted-set increments for one bucket (co-visitation) or the global popularity set.
# KEYS: bucket guard, then the zsets
# ARGV: partition, cap (0 = uncapped), then per zset: n_records, then per record (ascending offsets):
#       offset, n, (member, weight) * n
ZSET_APPLY = """
local gf = ARGV[1]
local guard = tonumber(redis.call('HGET', KEYS[1], gf) or '-1')
local cap = tonumber(ARGV[2])
local i = 3
local applied = 0
local max_off = guard
local max_off_s = nil
for k = 2, #KEYS do
  local key = KEYS[k]
  local nrec = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, nrec do
    local off = tonumber(ARGV[i])
    local n = tonumber(ARGV[i + 1])
    local j = i + 2
    if off > guard then
      for a = 0, n - 1 do
        redis.call('ZINCRBY', key, ARGV[j + 2 * a + 1], ARGV[j + 2 * a])
      end
      if cap > 0 and redis.call('ZCARD', key) > cap then
        redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
      end
      if off > max_off then max_off, max_off_s = off, ARGV[i] end
      applied = applied + 1
    end
    i = j + 2 * n
  end
end
if max_off_s then redis.call('HSET', KEYS[1], gf, max_off_s) end
return applied
"""

# Catalog upserts/deletes for one item bucket, each guarded by event time: an older event never
# overwrites a newer one. KEYS: meta hashes. ARGV per key: ts, op, n_fields, (field, value) * n_fields
# Returns one flag per key: 1 applied, 0 older than what is stored.
CATALOG_APPLY = """
local out = {}
local i = 1
for k = 1, #KEYS do
  local ts, op, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local cur = tonumber(redis.call('HGET', KEYS[k], 'ts') or '-1')
  if tonumber(ts) < cur then
    out[k] = 0
  else
    redis.call('DEL', KEYS[k])
    if op == 'delete' then
      redis.call('HSET', KEYS[k], 'ts', ts, 'deleted', '1')
    else
      redis.call('HSET', KEYS[k], 'ts', ts, unpack(ARGV, i + 3, i + 2 + 2 * n))
    end
    out[k] = 1
  end
  i = i + 3 + 2 * n
end
return out
"""

# Read the bucket's guards and each user's recent list.
# KEYS: bucket guard, then recent lists. ARGV: cap, then the partitions whose guards to return.
# Returns {guards (false where unset), list1, list2, ...}
USER_READ = """
local guards = {}
for p = 2, #ARGV do guards[p - 1] = redis.call('HGET', KEYS[1], ARGV[p]) end
local out = {guards}
local cap = tonumber(ARGV[1])
for k = 2, #KEYS do out[k] = redis.call('LRANGE', KEYS[k], 0, cap - 1) end
return out
"""

# KEYS: hashes of one bucket. ARGV: fields. Returns one array of values per key.
MULTI_HMGET = """
local out = {}
for k = 1, #KEYS do out[k] = redis.call('HMGET', KEYS[k], unpack(ARGV)) end
return out
"""

# KEYS: sorted sets of one bucket. ARGV[1]: how many, strongest first. Returns {member, score, ...} per key.
MULTI_ZTOP = """
local out = {}
local stop = tonumber(ARGV[1]) - 1
for k = 1, #KEYS do out[k] = redis.call('ZRANGE', KEYS[k], 0, stop, 'REV', 'WITHSCORES') end
return out
"""

# KEYS: string keys of one bucket. ARGV[1]: ttl seconds, then one value per key.
MULTI_SETEX = """
local ttl = ARGV[1]
for k = 1, #KEYS do redis.call('SET', KEYS[k], ARGV[k + 1], 'EX', ttl) end
return #KEYS
"""
