"""Lua scripts: each runs atomically on the server, so every multi-key update is all or nothing.

Session scripts get KEYS[1..6] = meta, history, fence, turns, affinity, lease (`SessionKeys.all`)
and, where a turn is involved, KEYS[7] = the turn record. A script is atomic but not
transactional (Redis does not roll back a half-run script), so each one makes every check before
its first write, and the writes after it cannot fail on keys of the right type.
"""

from __future__ import annotations

_PRELUDE = """
local function touch(ttl)
  -- Session-lifetime keys; EXPIRE on a key that does not exist yet is a no-op.
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function owned_by(tenant)
  return redis.call('HGET', KEYS[1], 'tenant') == tenant
end
local function meta()
  return redis.call('HMGET', KEYS[1], 'created_at', 'turns', 'metadata')
end
"""

# ARGV: tenant, created_at, metadata json, session ttl s
CREATE = (
    _PRELUDE
    + """
local owner = redis.call('HGET', KEYS[1], 'tenant')
if not owner then
  -- Leftovers of an expired session with the same id go.
  redis.call('DEL', KEYS[2], KEYS[5])
  redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[2],
             'turns', 0, 'metadata', ARGV[3])
elseif owner ~= ARGV[1] then
  return {'missing'}
end
touch(ARGV[4])
return {'ok', meta()}
"""
)

# ARGV: tenant, session ttl s
GET = (
    _PRELUDE
    + """
if not owned_by(ARGV[1]) then return {'missing'} end
touch(ARGV[2])
return {'ok', meta()}
"""
)

# ARGV: tenant, session ttl s
HISTORY = (
    _PRELUDE
    + """
if not owned_by(ARGV[1]) then return {'missing'} end
touch(ARGV[2])
return {'ok', redis.call('LRANGE', KEYS[2], 0, -1)}
"""
)

# KEYS[7]: turn record. ARGV: tenant, session ttl s
TURN_RECORD = (
    _PRELUDE
    + """
if not owned_by(ARGV[1]) then return {'missing'} end
touch(ARGV[2])
return {'ok', redis.call('HMGET', KEYS[7], 'state', 'result')}
"""
)

# ARGV: owner, turn id, lease ttl ms, session ttl s
ACQUIRE = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local held = redis.call('HMGET', KEYS[6], 'owner', 'token', 'turn_id')
-- The same owner retrying the same turn (a lost reply) takes over; anything else is busy.
if held[2] and not (held[1] == ARGV[1] and held[3] == ARGV[2]) then
  return {'busy', held[3]}
end
-- Tokens never fall behind the Redis clock in ms: they keep rising across a deleted or expired
-- session with the same id, and across a failover that lost the last INCRs, so an old holder
-- can never match a new token.
local token = redis.call('INCR', KEYS[3])
local now = now_ms()
if token < now then
  token = now
  redis.call('SET', KEYS[3], token)
end
redis.call('DEL', KEYS[6])
redis.call('HSET', KEYS[6], 'owner', ARGV[1], 'token', token, 'turn_id', ARGV[2])
redis.call('PEXPIRE', KEYS[6], ARGV[3])
touch(ARGV[4])
return {'ok', token}
"""
)

# KEYS: lease, turn record. ARGV: token, lease ttl ms
RENEW = """
local held = redis.call('HMGET', KEYS[1], 'token', 'turn_id')
if held[1] ~= ARGV[1] then return {'lost', held[2]} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
-- A running record lives as long as the lease, so a crashed gateway's record expires with it.
local rec = redis.call('HMGET', KEYS[2], 'state', 'token')
if rec[1] == 'running' and rec[2] == ARGV[1] then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return {'ok'}
"""

# KEYS: lease, turn record, turns index. ARGV: token, turn id
RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
-- A turn that ends without a commit leaves no "running" record behind.
local rec = redis.call('HMGET', KEYS[2], 'state', 'token')
if rec[1] == 'running' and rec[2] == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return 1
"""

# KEYS[7]: turn record. ARGV: token, turn id, lease ttl ms, session ttl s, record ttl s
BEGIN = (
    _PRELUDE
    + """
local held = redis.call('HMGET', KEYS[6], 'token', 'turn_id')
if held[1] ~= ARGV[1] then return {'lost', held[2]} end
local rec = redis.call('HMGET', KEYS[7], 'state', 'result')
if rec[1] == 'done' then return {'done', rec[2]} end
redis.call('DEL', KEYS[7])
redis.call('HSET', KEYS[7], 'state', 'running', 'token', ARGV[1])
redis.call('PEXPIRE', KEYS[7], ARGV[3])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
-- Scored by the latest the record can live, so pruning never forgets a live record.
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]) * 1000, ARGV[2])
touch(ARGV[4])
return {'running'}
"""
)

# KEYS[7]: turn record.
# ARGV: token, turn id, user json, assistant json, result json, record ttl s, session ttl s, now
COMMIT = (
    _PRELUDE
    + """
local held = redis.call('HMGET', KEYS[6], 'token', 'turn_id')
if held[1] ~= ARGV[1] then return {'lost', held[2]} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if redis.call('HGET', KEYS[7], 'state') == 'done' then return {'duplicate'} end
-- All checks are above: from here on every write succeeds, or (out of memory) the first fails.
local length = redis.call('RPUSH', KEYS[2], ARGV[3], ARGV[4])
redis.call('DEL', KEYS[7])
-- `index`: where the reply sits in the history, so it can be cut to what the user heard.
redis.call('HSET', KEYS[7], 'state', 'done', 'token', ARGV[1], 'result', ARGV[5],
           'index', length - 1)
redis.call('EXPIRE', KEYS[7], ARGV[6])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]) * 1000, ARGV[2])
local turns = redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[8])
touch(ARGV[7])
return {'ok', turns}
"""
)

# KEYS[7]: turn record. ARGV: tenant, assistant json, text, session ttl s
TRUNCATE = (
    _PRELUDE
    + """
if not owned_by(ARGV[1]) then return {'missing'} end
local rec = redis.call('HMGET', KEYS[7], 'state', 'index', 'result')
if rec[1] ~= 'done' or not rec[2] then return {'unknown'} end
redis.call('LSET', KEYS[2], tonumber(rec[2]), ARGV[2])
local result = cjson.decode(rec[3])
result['text'] = ARGV[3]
result['truncated'] = true
redis.call('HSET', KEYS[7], 'result', cjson.encode(result))
touch(ARGV[4])
return {'ok'}
"""
)
