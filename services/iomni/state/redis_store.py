"""`DialogueState`: the gateway's dialogue state in Redis (see docs/state.md).

Sessions belong to a tenant and hold the message history; a lease with a fencing token lets one
turn at a time change a session; `commit_turn` writes a finished turn in one atomic step; turn
records make a retried turn id return its stored result instead of running again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from iomni.errors import Internal, InvalidInput, IomniError, LeaseLost, NotFound, SessionBusy
from iomni.model.conversation import Message, TextPart
from iomni.state import scripts
from iomni.state.blobs import RedisEmbeddingCache, RedisMediaStore
from iomni.state.connection import guarded, text
from iomni.state.connection import text as text_of
from iomni.state.keys import SessionKeys, check_id
from iomni.turns.store import Lease, SessionInfo, TurnRecord

log = logging.getLogger(__name__)
# delete_session retries its WATCH transaction this often before giving up.
_DELETE_ATTEMPTS = 16


def _not_found(session_id: str) -> NotFound:
    # The one message for "missing" and "another tenant's": existence never leaks across tenants.
    return NotFound(f"session {session_id} not found")


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} must be JSON-serialisable: {exc}") from exc


class DialogueState:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        session_ttl_s: int = 86400,
        lease_ttl_ms: int = 6000,
        turn_record_ttl_s: int = 86400,
        media_ttl_s: int = 86400,
        embedding_ttl_s: int = 3600,
        max_media_bytes: int = 50 << 20,
        max_embedding_bytes: int = 64 << 20,
    ) -> None:
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            # Media and embeddings are binary; a decoding client would corrupt them.
            raise ValueError("DialogueState needs a Redis client with decode_responses=False")
        self.redis = redis
        self.session_ttl_s = session_ttl_s
        self.lease_ttl_ms = lease_ttl_ms
        self.turn_record_ttl_s = turn_record_ttl_s
        self.media_ttl_s = media_ttl_s
        self.embedding_ttl_s = embedding_ttl_s
        self.max_media_bytes = max_media_bytes
        self.max_embedding_bytes = max_embedding_bytes
        self._owns_client = False
        # register_script runs EVALSHA and reloads on NOSCRIPT (e.g. after a Redis restart).
        self._create = redis.register_script(scripts.CREATE)
        self._get = redis.register_script(scripts.GET)
        self._history = redis.register_script(scripts.HISTORY)
        self._turn_record = redis.register_script(scripts.TURN_RECORD)
        self._acquire = redis.register_script(scripts.ACQUIRE)
        self._renew = redis.register_script(scripts.RENEW)
        self._release = redis.register_script(scripts.RELEASE)
        self._begin = redis.register_script(scripts.BEGIN)
        self._commit = redis.register_script(scripts.COMMIT)
        self._truncate = redis.register_script(scripts.TRUNCATE)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> DialogueState:
        """A state on its own client (closed by `aclose`). `kw` are the constructor's options."""
        client = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            socket_connect_timeout=5,
            # Fail a hung call instead of stalling a turn; 50 MiB of media fits well within it.
            socket_timeout=30,
            health_check_interval=30,
        )
        state = cls(client, **kw)
        state._owns_client = True
        return state

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> DialogueState:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @guarded
    async def ping(self) -> None:
        await self.redis.ping()

    # -- sessions -------------------------------------------------------------------------------

    @guarded
    async def create_session(
        self, tenant: str, session_id: str | None = None, metadata: dict | None = None
    ) -> SessionInfo:
        """Create a session, or return it when this tenant already has one with this id."""
        _check_tenant(tenant)
        session_id = check_id("session id", session_id or uuid.uuid4().hex)
        keys = SessionKeys(session_id)
        reply = await self._create(
            keys=keys.all,
            args=[tenant, repr(time.time()), _json(metadata or {}, "metadata"), self.session_ttl_s],
        )
        return self._session_info(keys, tenant, reply)

    @guarded
    async def get_session(self, tenant: str, session_id: str) -> SessionInfo:
        keys = self._keys(session_id)
        reply = await self._get(keys=keys.all, args=[tenant, self.session_ttl_s])
        return self._session_info(keys, tenant, reply)

    @guarded
    async def history(self, tenant: str, session_id: str) -> list[Message]:
        keys = self._keys(session_id)
        reply = await self._history(keys=keys.all, args=[tenant, self.session_ttl_s])
        if text(reply[0]) != "ok":
            raise _not_found(session_id)
        try:
            return [Message.from_dict(json.loads(item)) for item in reply[1]]
        except (ValueError, IomniError) as exc:
            raise Internal(f"the stored history of session {session_id} is corrupt: {exc}") from exc

    @guarded
    async def delete_session(
        self, tenant: str, session_id: str, *, missing_ok: bool = False
    ) -> bool:
        """Remove every key of the session at once. A missing session (or another tenant's)
        raises NotFound, or returns False with `missing_ok`; True when it was deleted.
        """
        keys = self._keys(session_id)
        # WATCH/MULTI rather than Lua: the turn records to delete are only known after reading
        # the index, and a transaction may name keys it discovered (a script must declare them).
        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(_DELETE_ATTEMPTS):
                try:
                    await pipe.watch(keys.meta, keys.turns)
                    if await pipe.hget(keys.meta, "tenant") != tenant.encode():
                        await pipe.unwatch()
                        if missing_ok:
                            return False
                        raise _not_found(session_id)
                    turn_ids = await pipe.zrange(keys.turns, 0, -1)
                    pipe.multi()
                    pipe.delete(
                        *keys.all,
                        *(keys.record(text(t)) for t in turn_ids),
                        *(keys.attempts(text(t)) for t in turn_ids),
                    )
                    await pipe.execute()
                    return True
                except WatchError:
                    continue  # a turn began or committed meanwhile; read again
        raise Internal(f"session {session_id} kept changing while being deleted; try again")

    def _session_info(self, keys: SessionKeys, tenant: str, reply: list) -> SessionInfo:
        if text(reply[0]) != "ok":
            raise _not_found(keys.session_id)
        created_at, turns, metadata = reply[1]
        return SessionInfo(
            session_id=keys.session_id,
            tenant=tenant,
            created_at=float(created_at),
            turns=int(turns),
            metadata=json.loads(metadata) if metadata else {},
        )

    @staticmethod
    def _keys(session_id: str) -> SessionKeys:
        try:
            return SessionKeys(check_id("session id", session_id))
        except InvalidInput:
            # An id we could never have issued cannot exist.
            raise _not_found(session_id) from None

    # -- leases ---------------------------------------------------------------------------------

    @guarded
    async def acquire_lease(self, session_id: str, owner: str, turn_id: str) -> Lease:
        """Take the session for one turn. Raises SessionBusy while another turn holds it and
        NotFound when the session does not exist. Each lease gets a larger token than the last.
        """
        keys = self._keys(session_id)
        check_id("turn id", turn_id)
        started = time.time()
        reply = await self._acquire(
            keys=keys.all, args=[owner, turn_id, self.lease_ttl_ms, self.session_ttl_s]
        )
        status = text(reply[0])
        if status == "missing":
            raise _not_found(session_id)
        if status == "busy":
            raise SessionBusy(session_id, text(reply[1]) if reply[1] else "?")
        return Lease(session_id, owner, int(reply[1]), started + self.lease_ttl_ms / 1000, turn_id)

    @guarded
    async def renew_lease(self, lease: Lease) -> None:
        """Extend the lease by lease_ttl_ms (and its running turn record); LeaseLost if stale."""
        keys = self._keys(lease.session_id)
        started = time.time()
        reply = await self._renew(
            keys=[keys.lease, keys.record(lease.turn_id or "-")],
            args=[lease.token, self.lease_ttl_ms],
        )
        if text(reply[0]) != "ok":
            raise LeaseLost(lease.session_id, lease.token, text(reply[1]) if reply[1] else None)
        lease.expires_at = started + self.lease_ttl_ms / 1000

    @guarded
    async def release_lease(self, lease: Lease) -> None:
        """Give the session back. A no-op when the lease was lost: it never frees another's."""
        keys = self._keys(lease.session_id)
        released = await self._release(
            keys=[keys.lease, keys.record(lease.turn_id or "-"), keys.turns],
            args=[lease.token, lease.turn_id],
        )
        if not released:
            log.info("lease on %s token %d was already gone", lease.session_id, lease.token)

    # -- turns ----------------------------------------------------------------------------------

    @guarded
    async def turn_record(self, tenant: str, session_id: str, turn_id: str) -> TurnRecord | None:
        keys = self._keys(session_id)
        reply = await self._turn_record(
            keys=[*keys.all, keys.record(check_id("turn id", turn_id))],
            args=[tenant, self.session_ttl_s],
        )
        if text(reply[0]) != "ok":
            raise _not_found(session_id)
        state, result = reply[1]
        if state is None:
            return None
        return TurnRecord(turn_id, text(state), _result(result))  # type: ignore[arg-type]

    @guarded
    async def begin_turn(self, lease: Lease, turn_id: str) -> TurnRecord | None:
        """The stored record when this turn id is already done (return its result, do not run);
        otherwise mark it running (expiring with the lease) and return None.
        """
        keys = self._keys(lease.session_id)
        reply = await self._begin(
            keys=[*keys.all, keys.record(check_id("turn id", turn_id))],
            args=[
                lease.token,
                turn_id,
                self.lease_ttl_ms,
                self.session_ttl_s,
                self.turn_record_ttl_s,
            ],
        )
        status = text(reply[0])
        if status == "lost":
            raise LeaseLost(lease.session_id, lease.token, text(reply[1]) if reply[1] else None)
        if status == "done":
            return TurnRecord(turn_id, "done", _result(reply[1]))
        return None

    @guarded
    async def commit_turn(
        self, lease: Lease, turn_id: str, user: Message, assistant: Message, result: dict
    ) -> None:
        """Append the exchange, mark the turn done with `result`, count it: all or nothing.

        LeaseLost (nothing written) when the lease token is no longer current. Committing a turn
        id that is already done changes nothing.
        """
        keys = self._keys(lease.session_id)
        reply = await self._commit(
            keys=[*keys.all, keys.record(check_id("turn id", turn_id))],
            args=[
                lease.token,
                turn_id,
                _json(user.to_dict(), "the user message"),
                _json(assistant.to_dict(), "the assistant message"),
                _json(result, "the turn result"),
                self.turn_record_ttl_s,
                self.session_ttl_s,
                repr(time.time()),
            ],
        )
        status = text(reply[0])
        if status == "lost":
            raise LeaseLost(lease.session_id, lease.token, text(reply[1]) if reply[1] else None)
        if status == "missing":
            raise _not_found(lease.session_id)
        if status == "duplicate":
            log.warning(
                "turn %s of %s was already committed; kept the first", turn_id, lease.session_id
            )

    @guarded
    async def truncate_reply(self, tenant: str, session_id: str, turn_id: str, text: str) -> bool:
        """Cut the stored reply of a done turn to `text` (what the user heard before they
        interrupted it). False when the turn is not done (or predates reply indexes)."""
        keys = self._keys(session_id)
        assistant = Message("assistant", (TextPart(text),))
        reply = await self._truncate(
            keys=[*keys.all, keys.record(check_id("turn id", turn_id))],
            args=[tenant, _json(assistant.to_dict(), "the reply"), text, self.session_ttl_s],
        )
        status = text_of(reply[0])
        if status == "missing":
            raise _not_found(session_id)
        return status == "ok"

    # -- the event log --------------------------------------------------------------------------

    @guarded
    async def mark_published(self, session_id: str, turn_id: str) -> None:
        """The turn's events (its `done` included) are acknowledged by Kafka: a redelivered
        request must not publish them again."""
        await self.redis.hset(self._keys(session_id).record(turn_id), "published", "1")

    @guarded
    async def next_attempt(self, session_id: str, turn_id: str) -> int:
        """1 the first time a worker starts this turn, then 2, 3, ... (events carry it, so a
        consumer can drop what a worker that died mid-turn published)."""
        key = self._keys(session_id).attempts(check_id("turn id", turn_id))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self.turn_record_ttl_s)
            attempt, _ = await pipe.execute()
        return int(attempt)

    @guarded
    async def was_published(self, session_id: str, turn_id: str) -> bool:
        value = await self.redis.hget(self._keys(session_id).record(turn_id), "published")
        return value is not None and text(value) == "1"

    # -- affinity -------------------------------------------------------------------------------

    @guarded
    async def get_affinity(self, session_id: str) -> str | None:
        """The `llm` replica that holds this session's KV cache, if any."""
        value = await self.redis.getex(self._keys(session_id).affinity, ex=self.session_ttl_s)
        return None if value is None else text(value)

    @guarded
    async def set_affinity(self, session_id: str, replica: str) -> None:
        await self.redis.set(self._keys(session_id).affinity, replica, ex=self.session_ttl_s)

    # -- media ----------------------------------------------------------------------------------

    def media_store(self, scope: str = "") -> RedisMediaStore:
        """Pass the tenant as `scope` to keep tenants' media apart (no dedup across them)."""
        return RedisMediaStore(
            self.redis, ttl_s=self.media_ttl_s, max_bytes=self.max_media_bytes, scope=scope
        )

    def embedding_cache(self, scope: str = "") -> RedisEmbeddingCache:
        return RedisEmbeddingCache(
            self.redis, ttl_s=self.embedding_ttl_s, max_bytes=self.max_embedding_bytes, scope=scope
        )


def _check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not tenant:
        raise InvalidInput("a session needs a non-empty tenant")


def _result(raw: bytes | None) -> dict:
    return json.loads(raw) if raw else {}
