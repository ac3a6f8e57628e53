"""What the turn core asks of dialogue state, and an in-memory implementation.

`DialogueStore` is the contract: sessions owned by a tenant, their history, a lease with a
fencing token so one turn at a time changes a session, turn records that make a retried turn id
return its stored result, and an atomic commit. Redis (`iomni.state.DialogueState`) is the
production implementation; `MemoryDialogueStore` serves the embedded default and unit tests with
the same semantics inside one process.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from iomni.engine.cache import EmbeddingCache, MediaStore, MemoryEmbeddingCache, MemoryMediaStore
from iomni.errors import InvalidInput, LeaseLost, NotFound, SessionBusy
from iomni.model.conversation import Message, TextPart

TurnState = Literal["running", "done"]


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    tenant: str
    created_at: float  # epoch seconds
    turns: int  # committed turns
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lease:
    """The right to run one turn of a session. `token` fences out holders whose lease lapsed.

    Mutable on purpose: `renew_lease` moves `expires_at` forward.
    """

    session_id: str
    owner: str
    token: int
    expires_at: float  # epoch seconds, a lower bound: the server-side TTL starts later
    turn_id: str = ""


@dataclass(frozen=True)
class TurnRecord:
    turn_id: str
    state: TurnState
    result: dict[str, Any] = field(default_factory=dict)


class DialogueStore(Protocol):
    lease_ttl_ms: int

    async def ping(self) -> None: ...

    async def create_session(
        self, tenant: str, session_id: str | None = None, metadata: dict | None = None
    ) -> SessionInfo: ...

    async def get_session(self, tenant: str, session_id: str) -> SessionInfo: ...

    async def history(self, tenant: str, session_id: str) -> list[Message]: ...

    async def delete_session(
        self, tenant: str, session_id: str, *, missing_ok: bool = False
    ) -> bool: ...

    async def acquire_lease(self, session_id: str, owner: str, turn_id: str) -> Lease:
        """SessionBusy while another turn holds it; NotFound for a missing session."""
        ...

    async def renew_lease(self, lease: Lease) -> None:
        """Extend by lease_ttl_ms; LeaseLost when the token is no longer current."""
        ...

    async def release_lease(self, lease: Lease) -> None:
        """A no-op when the lease was lost: it never frees another holder's."""
        ...

    async def begin_turn(self, lease: Lease, turn_id: str) -> TurnRecord | None:
        """The stored record when `turn_id` is done; otherwise mark it running, return None."""
        ...

    async def commit_turn(
        self, lease: Lease, turn_id: str, user: Message, assistant: Message, result: dict
    ) -> None:
        """Append the exchange and mark the turn done, all or nothing; LeaseLost if fenced."""
        ...

    async def turn_record(
        self, tenant: str, session_id: str, turn_id: str
    ) -> TurnRecord | None: ...

    async def truncate_reply(self, tenant: str, session_id: str, turn_id: str, text: str) -> bool:
        """Cut the stored reply of a done turn to `text` (what the user heard before they
        interrupted it); False when that turn is not done."""
        ...

    async def get_affinity(self, session_id: str) -> str | None:
        """The llm replica holding this session's KV cache, if any."""
        ...

    async def set_affinity(self, session_id: str, replica: str) -> None: ...

    def media_store(self, scope: str = "") -> MediaStore: ...

    def embedding_cache(self, scope: str = "") -> EmbeddingCache: ...


@dataclass
class _Session:
    info: SessionInfo
    history: list[Message] = field(default_factory=list)
    lease: Lease | None = None
    records: dict[str, TurnRecord] = field(default_factory=dict)
    affinity: str | None = None
    published: set[str] = field(default_factory=set)
    reply_index: dict[str, int] = field(default_factory=dict)  # turn id -> its reply's index
    attempts: dict[str, int] = field(default_factory=dict)


class MemoryDialogueStore:
    """`DialogueStore` in one process's memory (the embedded default, unit tests).

    Same rules as Redis: leases expire after `lease_ttl_ms` unless renewed, tokens only grow, a
    lost lease writes nothing. State is gone when the process ends.
    """

    def __init__(self, lease_ttl_ms: int = 6000) -> None:
        self.lease_ttl_ms = lease_ttl_ms
        self._sessions: dict[str, _Session] = {}
        self._token = 0
        self._media = MemoryMediaStore()
        self._embeddings = MemoryEmbeddingCache()

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _owned(self, tenant: str, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None or session.info.tenant != tenant:
            raise NotFound(f"session {session_id} not found")
        return session

    def _live_lease(self, session: _Session) -> Lease | None:
        lease = session.lease
        if lease is not None and lease.expires_at <= time.time():
            session.lease = None
            session.records = {
                k: r for k, r in session.records.items() if r.state == "done"
            }  # a running record lives as long as its lease
        return session.lease

    def _held(self, lease: Lease) -> _Session:
        session = self._sessions.get(lease.session_id)
        held = self._live_lease(session) if session else None
        if session is None or held is None or held.token != lease.token:
            holder = held.turn_id if held else None
            raise LeaseLost(lease.session_id, lease.token, holder)
        return session

    async def create_session(
        self, tenant: str, session_id: str | None = None, metadata: dict | None = None
    ) -> SessionInfo:
        if not tenant:
            raise InvalidInput("a session needs a non-empty tenant")
        session_id = session_id or uuid.uuid4().hex
        existing = self._sessions.get(session_id)
        if existing is not None:
            return self._owned(tenant, session_id).info
        info = SessionInfo(session_id, tenant, time.time(), 0, dict(metadata or {}))
        self._sessions[session_id] = _Session(info)
        return info

    async def get_session(self, tenant: str, session_id: str) -> SessionInfo:
        return self._owned(tenant, session_id).info

    async def history(self, tenant: str, session_id: str) -> list[Message]:
        return list(self._owned(tenant, session_id).history)

    async def delete_session(
        self, tenant: str, session_id: str, *, missing_ok: bool = False
    ) -> bool:
        try:
            self._owned(tenant, session_id)
        except NotFound:
            if missing_ok:
                return False
            raise
        del self._sessions[session_id]
        return True

    async def acquire_lease(self, session_id: str, owner: str, turn_id: str) -> Lease:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"session {session_id} not found")
        held = self._live_lease(session)
        if held is not None and not (held.owner == owner and held.turn_id == turn_id):
            raise SessionBusy(session_id, held.turn_id)
        self._token = max(self._token + 1, int(time.time() * 1000))
        session.lease = Lease(
            session_id, owner, self._token, time.time() + self.lease_ttl_ms / 1000, turn_id
        )
        return Lease(**vars(session.lease))

    async def renew_lease(self, lease: Lease) -> None:
        session = self._held(lease)
        assert session.lease is not None
        session.lease.expires_at = lease.expires_at = time.time() + self.lease_ttl_ms / 1000

    async def release_lease(self, lease: Lease) -> None:
        session = self._sessions.get(lease.session_id)
        if session is None or session.lease is None or session.lease.token != lease.token:
            return
        session.lease = None
        record = session.records.get(lease.turn_id)
        if record is not None and record.state == "running":
            del session.records[lease.turn_id]

    async def begin_turn(self, lease: Lease, turn_id: str) -> TurnRecord | None:
        session = self._held(lease)
        record = session.records.get(turn_id)
        if record is not None and record.state == "done":
            return record
        session.records[turn_id] = TurnRecord(turn_id, "running")
        return None

    async def commit_turn(
        self, lease: Lease, turn_id: str, user: Message, assistant: Message, result: dict
    ) -> None:
        session = self._held(lease)
        record = session.records.get(turn_id)
        if record is not None and record.state == "done":
            return
        session.history += [user, assistant]
        session.reply_index[turn_id] = len(session.history) - 1
        session.records[turn_id] = TurnRecord(turn_id, "done", dict(result))
        info = session.info
        session.info = SessionInfo(
            info.session_id, info.tenant, info.created_at, info.turns + 1, info.metadata
        )

    async def turn_record(self, tenant: str, session_id: str, turn_id: str) -> TurnRecord | None:
        return self._owned(tenant, session_id).records.get(turn_id)

    async def truncate_reply(self, tenant: str, session_id: str, turn_id: str, text: str) -> bool:
        session = self._owned(tenant, session_id)
        index = session.reply_index.get(turn_id)
        record = session.records.get(turn_id)
        if index is None or record is None or record.state != "done":
            return False
        session.history[index] = Message("assistant", (TextPart(text),))
        result = {**record.result, "text": text, "truncated": True}
        session.records[turn_id] = TurnRecord(turn_id, "done", result)
        return True

    async def get_affinity(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        return session.affinity if session else None

    async def set_affinity(self, session_id: str, replica: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.affinity = replica

    async def mark_published(self, session_id: str, turn_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.published.add(turn_id)

    async def next_attempt(self, session_id: str, turn_id: str) -> int:
        session = self._sessions.get(session_id)
        if session is None:
            return 1
        session.attempts[turn_id] = session.attempts.get(turn_id, 0) + 1
        return session.attempts[turn_id]

    async def was_published(self, session_id: str, turn_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and turn_id in session.published

    def media_store(self, scope: str = "") -> MediaStore:
        return self._media

    def embedding_cache(self, scope: str = "") -> EmbeddingCache:
        return self._embeddings
