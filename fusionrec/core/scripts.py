"""Lua scripts that read and apply one batch, one call per hash-tag bucket.

Every script touches only keys of one bucket (declared in KEYS), so the layout works on Redis
Cluster. Large payloads travel as one msgpack argument (unpacked by Redis' built-in ``cmsgpack``):
doubles survive exactly, and Redis formats Lua numbers for commands in shortest round-trip form.
"""

from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import ClusterPipeline, RedisCluster


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client or one of its pipelines."""
    return isinstance(client, RedisCluster | ClusterPipeline)


class LuaScript:
    """A Lua script called like redis-py's ``Script`` (``script(keys=…, args=…, client=pipe)``) on a
    Redis or a Redis Cluster client and their pipelines.

    On a single Redis it is redis-py's ``Script`` (``EVALSHA``, loaded before a pipeline runs). A
    Redis Cluster pipeline cannot send ``EVALSHA`` through redis-py, so there each call is an ``EVAL``
    routed by its keys' slot; every script's keys share one hash tag, so one node runs it.
    """

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client = client
        self.source = source
        self._script = None if is_cluster(client) else client.register_script(source)

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        if self._script is not None:
            return self._script(keys=keys, args=args, client=client)
        target = self.client if client is None else client
        return target.execute_command("EVAL", self.source, len(keys), *keys, *args)


def register(client: redis.Redis, source: str) -> LuaScript:
    return LuaScript(client, source)


# Write scripts are compare-and-apply: ARGV carries the lowest offset in the payload; if the bucket's
# guard for the partition is already at or past it, nothing is applied and the guard is returned so
# the caller can drop what is in and send the rest. Otherwise everything is applied, the guard moves
# to the payload's highest offset, and -1 is returned.

# KEYS: bucket guard, then per user: state, recent, items, aff, event ids, buys
# ARGV: partition, ttl_s, min_offset, max_offset, msgpack([per user:
#       [last_seen, [type, count, ...], [items pushed to recent, oldest push first], [item, weight, ...],
#        [member, weight, ...], [item, purchase ts, ...], [event-id member, event ts, ...] (remembered),
#        [event-id member, ...] (forgotten)]]), recent cap
# ``buys`` holds per purchased item ``<purchases>:<first ts>:<last ts>`` (event times, ms); a purchase
# older than the last moves only the first.
# Recent items are pushed (moved to the front) rather than replaced, so two writers of one user
# (events of one user on two partitions) both keep their items.
USER_APPLY = """
local g = redis.call('HGET', KEYS[1], ARGV[1])
if g and tonumber(g) >= tonumber(ARGV[3]) then return tonumber(g) end
local ttl = ARGV[2]
local users = cmsgpack.unpack(ARGV[5])
for u = 1, #users do
  local ks, kr, ki, ka, ke = KEYS[6 * u - 4], KEYS[6 * u - 3], KEYS[6 * u - 2], KEYS[6 * u - 1], KEYS[6 * u]
  local kb = KEYS[6 * u + 1]
  local rec = users[u]
  local counts, recent, items, aff, buys, seen, forgot = rec[2], rec[3], rec[4], rec[5], rec[6], rec[7], rec[8]
  for a = 1, #counts, 2 do redis.call('HINCRBY', ks, 'n:' .. counts[a], counts[a + 1]) end
  local prev = tonumber(redis.call('HGET', ks, 'last_seen') or '-1')
  if rec[1] > prev then redis.call('HSET', ks, 'last_seen', rec[1]) end
  if #recent > 0 then
    for a = 1, #recent do
      redis.call('LREM', kr, 0, recent[a])
      redis.call('LPUSH', kr, recent[a])
    end
    redis.call('LTRIM', kr, 0, tonumber(ARGV[6]) - 1)
  end
  for a = 1, #items, 2 do redis.call('ZINCRBY', ki, items[a + 1], items[a]) end
  for a = 1, #aff, 2 do redis.call('ZINCRBY', ka, aff[a + 1], aff[a]) end
  for a = 1, #seen, 2 do redis.call('ZADD', ke, seen[a + 1], seen[a]) end
  if #forgot > 0 then redis.call('ZREM', ke, unpack(forgot)) end
  for a = 1, #buys, 2 do
    local ts = buys[a + 1]
    local n, first, last = 1, ts, ts
    local cur = redis.call('HGET', kb, buys[a])
    if cur then
      local cn, cf, cl = string.match(cur, '^(%d+):(-?%d+):(-?%d+)$')
      n, first, last = tonumber(cn) + 1, math.min(tonumber(cf), ts), math.max(tonumber(cl), ts)
    end
    redis.call('HSET', kb, buys[a], string.format('%d:%d:%d', n, first, last))
  end
  redis.call('EXPIRE', ks, ttl)
  redis.call('EXPIRE', kr, ttl)
  redis.call('EXPIRE', ki, ttl)
  redis.call('EXPIRE', ka, ttl)
  redis.call('EXPIRE', ke, ttl)
  redis.call('EXPIRE', kb, ttl)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return -1
"""

# Sorted-set increments for one item bucket (co-visitation) or the global popularity set. Records are
# applied in offset order and, with a cap, the set is trimmed to its strongest ``cap`` members after
# every record, so the result does not depend on how events were cut into batches. Membership count is
# tracked from ZINCRBY replies (a reply equal to the increment means a new member; weights are > 0).
# KEYS: bucket guard, then the zsets
# ARGV: partition, cap (0 = uncapped), min_offset, max_offset,
#       msgpack([per zset: [per record: [member, weight, member, weight, ...]]]), ttl_s (0 = none)
ZSET_APPLY = """
local g = redis.call('HGET', KEYS[1], ARGV[1])
if g and tonumber(g) >= tonumber(ARGV[3]) then return tonumber(g) end
local cap = tonumber(ARGV[2])
local data = cmsgpack.unpack(ARGV[5])
for k = 2, #KEYS do
  local key = KEYS[k]
  local records = data[k - 1]
  local card = nil
  if cap > 0 then card = redis.call('ZCARD', key) end
  for r = 1, #records do
    local rec = records[r]
    for a = 1, #rec, 2 do
      local w = rec[a + 1]
      local s = tonumber(redis.call('ZINCRBY', key, w, rec[a]))
      if card and s == w then card = card + 1 end
    end
    if card and card > cap then
      redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
      card = cap
    end
  end
  if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', key, ARGV[6]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return -1
"""

# Catalog upserts/deletes for one item bucket, each guarded by event time: an older event never
# overwrites a newer one. KEYS: meta hashes. ARGV per key: ts, op, n_fields, (field, value) * n_fields
# Returns one flag per key: 1 applied, 0 older than what is stored.
# ``listed`` is the earliest upsert time of an item whose hash this script created: kept through
# later upserts and deletes, lowered by an older upsert that arrives late (an item stored before the
# field existed has none: its listing time is unknown).
CATALOG_APPLY = """
local out = {}
local i = 1
for k = 1, #KEYS do
  local ts, op, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local cur = tonumber(redis.call('HGET', KEYS[k], 'ts') or '-1')
  local listed = redis.call('HGET', KEYS[k], 'listed')
  if op ~= 'delete' and (cur < 0 or (listed and tonumber(ts) < tonumber(listed))) then listed = ts end
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
  if listed then redis.call('HSET', KEYS[k], 'listed', listed) end
  i = i + 3 + 2 * n
end
return out
"""

# Read the bucket's guards and each user's recent list and remembered event ids.
# KEYS: bucket guard, then per user: recent list, event-id zset. ARGV: cap, then the partitions whose
# guards to return. Returns {guards (false where unset), recent1, ids1, recent2, ids2, ...}; ids are
# {member, score, ...}.
USER_READ = """
local guards = {}
for p = 2, #ARGV do guards[p - 1] = redis.call('HGET', KEYS[1], ARGV[p]) end
local out = {guards}
local cap = tonumber(ARGV[1])
for k = 2, #KEYS, 2 do
  out[k] = redis.call('LRANGE', KEYS[k], 0, cap - 1)
  out[k + 1] = redis.call('ZRANGE', KEYS[k + 1], 0, -1, 'WITHSCORES')
end
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

# A bucket's users' strongest items and what ``buys`` holds of them. KEYS: per user: items zset, buys hash.
# ARGV: how many items. Returns per user {member, score, ...} and the buys values of those members.
USER_ITEMS_READ = """
local out = {}
local stop = tonumber(ARGV[1]) - 1
for k = 1, #KEYS, 2 do
  local top = redis.call('ZRANGE', KEYS[k], 0, stop, 'REV', 'WITHSCORES')
  local ids = {}
  for a = 1, #top, 2 do ids[#ids + 1] = top[a] end
  local bought = {}
  if #ids > 0 then bought = redis.call('HMGET', KEYS[k + 1], unpack(ids)) end
  out[#out + 1] = top
  out[#out + 1] = bought
end
return out
"""

# KEYS: ``rec`` lists of one bucket. ARGV[1]: ttl seconds, then per key its event time and its JSON.
# A list is written only when no stored list is newer (its ``event_ts``): a process that ranked from
# older state (a previous partition owner, say) never replaces a newer list. Returns how many it wrote.
NEWER_RECS = """
local ttl = ARGV[1]
local written = 0
for k = 1, #KEYS do
  local ts = tonumber(ARGV[2 * k])
  local cur = redis.call('GET', KEYS[k])
  local old = cur and tonumber(string.match(cur, '"event_ts":(%d+)'))
  if not old or old <= ts then
    redis.call('SET', KEYS[k], ARGV[2 * k + 1], 'EX', ttl)
    written = written + 1
  end
end
return written
"""

# KEYS: string keys of one bucket. ARGV[1]: ttl seconds, then one value per key.
MULTI_SETEX = """
local ttl = ARGV[1]
for k = 1, #KEYS do redis.call('SET', KEYS[k], ARGV[k + 1], 'EX', ttl) end
return #KEYS
"""

# KEYS: one hash. ARGV: field, value, field, value, ... Each field becomes the larger of what it holds
# and the value (a writer that lost its partitions and writes late never moves a position back).
HASH_MAX = """
for a = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[a])
  if not cur or tonumber(cur) < tonumber(ARGV[a + 1]) then redis.call('HSET', KEYS[1], ARGV[a], ARGV[a + 1]) end
end
return 0
"""
