"""The Redis key layout. Every key lives under one versioned prefix so a layout change can run
side by side with the old one (`iomni:v2:` …) and old keys simply expire.

A session's keys share the hash tag `{<session_id>}`: they land in one Redis Cluster slot, so the
multi-key Lua scripts stay legal on a cluster too.
"""

from __future__ import annotations

import re

from iomni.errors import InvalidInput

PREFIX = "iomni:v1:"
# Ids go into key names: no braces (they would break the hash tag), no spaces, bounded length.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidInput(
            f"{kind} {value!r} is not valid: use 1-128 characters from letters, digits and ._:- "
            "starting with a letter or digit"
        )
    return value


class SessionKeys:
    """The keys of one session, in the order the Lua scripts expect them (KEYS[1..6])."""

    def __init__(self, session_id: str) -> None:
        base = f"{PREFIX}session:{{{session_id}}}"
        self.session_id = session_id
        self.meta = f"{base}:meta"
        self.history = f"{base}:history"
        self.fence = f"{base}:fence"
        self.turns = f"{base}:turns"
        self.affinity = f"{base}:affinity"
        self.lease = f"{base}:lease"
        self._base = base

    def record(self, turn_id: str) -> str:
        return f"{self._base}:turn:{turn_id}"

    def attempts(self, turn_id: str) -> str:
        """How many times a turn worker started this turn (Kafka event attempts)."""
        return f"{self._base}:attempts:{turn_id}"

    @property
    def all(self) -> list[str]:
        # Keep in step with the KEYS order in scripts.py.
        return [self.meta, self.history, self.fence, self.turns, self.affinity, self.lease]


def _scope(scope: str) -> str:
    # "shared" cannot collide with a scope: scopes are ids and get a "t=" prefix.
    return f"t={check_id('scope', scope)}" if scope else "shared"


def media_key(scope: str, sha256: str) -> str:
    return f"{PREFIX}media:{_scope(scope)}:{sha256}"


def embedding_key(scope: str, key: str) -> str:
    return f"{PREFIX}emb:{_scope(scope)}:{key}"
