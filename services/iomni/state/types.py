"""The values the dialogue state hands out, and the two errors only it raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from iomni.errors import IomniError

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


class SessionBusy(IomniError):
    """Another turn holds the session's lease. Retrying after it finishes may succeed."""

    code = "ABORTED"

    def __init__(self, session_id: str, turn_id: str) -> None:
        super().__init__(
            f"session {session_id} is busy with turn {turn_id}; wait for it to finish or cancel it"
        )
        self.session_id = session_id
        self.turn_id = turn_id


class LeaseLost(IomniError):
    """The caller's lease token is no longer current: it expired or another turn took over."""

    code = "ABORTED"

    def __init__(self, lease: Lease, holder_turn: str | None = None) -> None:
        now = f"; turn {holder_turn} holds it now" if holder_turn else ""
        super().__init__(
            f"the lease on session {lease.session_id} (token {lease.token}) is no longer held: "
            f"it expired or was taken over{now}; nothing was written"
        )
        self.session_id = lease.session_id
        self.token = lease.token
