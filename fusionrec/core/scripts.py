"""Lua scripts that read and apply one batch, one call per hash-tag bucket.

Every script touches only keys of one bucket (declared in KEYS), so the layout works on Redis
Cluster. Large payloads travel as one msgpack argument (unpacked by Redis' built-in ``cmsgpack``):
doubles survive exactly, and Redis formats Lua numbers for commands in shortest round-trip form.
"""

import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.client import Pipeline
from redis.cluster import ClusterPipeline, RedisCluster

# How often a pipeline makes sure a script is loaded (``SCRIPT EXISTS``, one round trip before the
# pipeline runs); in between it sends ``EVALSHA`` alone. A Redis that lost its scripts (a restart)
# answers NOSCRIPT to those calls, which callers retry as any transient error, until the next check
# loads them.
CHECK_EVERY_S = 1.0


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client or one of its pipelines."""
    return isinstance(client, RedisCluster | ClusterPipeline)


class LuaScript:
    """A Lua script called like redis-py's ``Script`` (``script(keys=…, args=…, client=pipe)``) on a
    Redis or a Redis Cluster client and their pipelines.

    On a single Redis it is redis-py's ``Script`` (``EVALSHA``; loaded when Redis answers NOSCRIPT),
    except that in a pipeline its ``SCRIPT EXISTS`` check, a round trip of its own, is made at most
    every :data:`CHECK_EVERY_S`, not before every pipeline. A Redis Cluster pipeline cannot send
    ``EVALSHA`` through redis-py, so there each call is an ``EVAL`` routed by its keys' slot; every
    script's keys share one hash tag, so one node runs it.
    """

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client = client
        self.source = source
        self._script = None if is_cluster(client) else client.register_script(source)
        self._checked = -CHECK_EVERY_S  # monotonic time a pipeline last made sure the script is loaded

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        if self._script is not None:
            if isinstance(client, Pipeline):
                now = time.monotonic()
                if now - self._checked < CHECK_EVERY_S:
                    return client.evalsha(self._script.sha, len(keys), *keys, *args)
                self._checked = now
            return self._script(keys=keys, args=args, client=client)
        target = self.client if client is None else client
        return target.execute_command("EVAL", self.source, len(keys), *keys, *args)


def register(client: redis.Redis, source: str) -> LuaScript:
    return LuaScript(client, source)


# Write scripts are compare-and-apply: ARGV carries the lowest offset in the payload; if the bucket's
# guard for the partition is already at or past it, nothing is applied and the guard is returned so
# the caller can drop what is in and send the rest. Otherwise everything is applied, the guard moves
# to the payload's highest offset, and -1 is returned.

# Whole user states of one bucket, compare-and-set: the consumer that owns a user's partition keeps
# the user's state in process and writes it whole; Redis stores it and does no arithmetic.
# KEYS: bucket guard, then per user: the state hash (fields ``v`` version, ``d`` msgpack state,
#       ``last_seen``).
# ARGV: ttl_s, number of partitions, per partition: partition, min_offset, max_offset; then per user:
#       the version the writer read ('' when none was stored), last_seen, state.
# Nothing is written unless every partition's guard is below its min_offset and every user's stored
# version is the one read: a stale writer, or another consumer that wrote one of these users since
# (their events on two partitions), is refused. Returns {0, guard conflicts, user conflicts}, or {1,
# new version per user}. A version starts at the server's time in microseconds, so a state that
# expired and was written anew never has a version some process read before.
USER_STORE = """
local np = tonumber(ARGV[2])
local bad_g, bad_u = 0, 0
for i = 0, np - 1 do
  local g = redis.call('HGET', KEYS[1], ARGV[3 + 3 * i])
  if g and tonumber(g) >= tonumber(ARGV[4 + 3 * i]) then bad_g = bad_g + 1 end
end
local base = 3 + 3 * np
for u = 2, #KEYS do
  local cur = redis.call('HGET', KEYS[u], 'v') or ''
  if cur ~= ARGV[base + 3 * (u - 2)] then bad_u = bad_u + 1 end
end
if bad_g + bad_u > 0 then return {0, bad_g, bad_u} end
local ttl = ARGV[1]
local out = {1}
local t = nil
for u = 2, #KEYS do
  local a = base + 3 * (u - 2)
  if ARGV[a] == '' then
    if not t then t = redis.call('TIME') end
    redis.call('HSET', KEYS[u], 'v', t[1] .. string.format('%06d', tonumber(t[2])))
  end
  out[u] = redis.call('HINCRBY', KEYS[u], 'v', 1)
  redis.call('HSET', KEYS[u], 'last_seen', ARGV[a + 1], 'd', ARGV[a + 2])
  redis.call('EXPIRE', KEYS[u], ttl)
end
for i = 0, np - 1 do redis.call('HSET', KEYS[1], ARGV[3 + 3 * i], ARGV[5 + 3 * i]) end
return out
"""

# Sorted-set increments for one item bucket (co-visitation) or the global popularity set, from every
# partition the caller has records of: one call per bucket, whatever the number of partitions. Records
# are applied in the order given (a partition's in offset order) and, with a cap, the set is trimmed
# to its strongest ``cap`` members after every record, so the result does not depend on how events
# were cut into batches. Membership count is tracked from ZINCRBY replies (a reply equal to the
# increment means a new member; weights are > 0).
# KEYS: bucket guard, then the zsets
# ARGV: cap (0 = uncapped), msgpack([per zset: [per record: [member, weight, member, weight, ...]]]),
#       ttl_s (0 = none), how many of the zsets, from the first, get their TTL set to ttl_s, the number
#       of partitions, then per partition: partition, min_offset, max_offset
# Nothing is applied if any partition's guard is at or past its min_offset: then the guard of each
# partition is returned (-1 where none is stored), for the caller to send again what is above them.
# Otherwise everything is applied, each guard moves to its partition's max_offset, and -1 is returned.
ZSET_APPLY = """
local np = tonumber(ARGV[5])
local guards, stale = {}, false
for i = 0, np - 1 do
  local g = redis.call('HGET', KEYS[1], ARGV[6 + 3 * i])
  guards[i + 1] = g or -1
  if g and tonumber(g) >= tonumber(ARGV[7 + 3 * i]) then stale = true end
end
if stale then return guards end
local cap = tonumber(ARGV[1])
local data = cmsgpack.unpack(ARGV[2])
local ttl, refresh = tonumber(ARGV[3]), tonumber(ARGV[4])
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
  if k - 1 <= refresh and ttl > 0 then redis.call('EXPIRE', key, ARGV[3]) end
end
for i = 0, np - 1 do redis.call('HSET', KEYS[1], ARGV[6 + 3 * i], ARGV[8 + 3 * i]) end
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

# Read the bucket's guards and each user's stored state.
# KEYS: bucket guard, then per user: state hash. ARGV: the partitions whose guards to return.
# Returns {guards (false where unset), {version, state} per user (false where unset)}.
USER_READ = """
local guards = {}
for p = 1, #ARGV do guards[p] = redis.call('HGET', KEYS[1], ARGV[p]) end
local out = {guards}
for k = 2, #KEYS do out[k] = redis.call('HMGET', KEYS[k], 'v', 'd') end
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

# KEYS: hashes of one bucket. ARGV[1]: a field. Returns its value per key (false where unset).
MULTI_HGET = """
local out = {}
for k = 1, #KEYS do out[k] = redis.call('HGET', KEYS[k], ARGV[1]) end
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
