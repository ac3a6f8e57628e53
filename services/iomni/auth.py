"""Tenants and their API keys.

The tenants file holds SHA-256 hashes of keys, never the keys themselves; a key may expire:

    {"tenants": [{"name": "acme", "api_key_sha256": ["<hex>", ...]},
                 {"name": "trial", "api_keys": [{"sha256": "<hex>", "expires_at": 1767225600}]}]}

(`expires_at`: Unix seconds.) The file is re-read when it changes (checked at most every
`reload_s`), so a key removed from it stops working within seconds, without a restart; a file
that no longer parses keeps the last good one in force and is logged.

Clients send `authorization: Bearer <key>` (or `x-api-key: <key>`) in the call metadata.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iomni.errors import InvalidInput, Unauthenticated

log = logging.getLogger(__name__)
__all__ = ["Tenants", "Unauthenticated", "key_hash", "write_dev_tenant"]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class _Key:
    tenant: str
    expires_at: float | None = None


class Tenants:
    def __init__(
        self, keys: dict[str, _Key | str], path: Path | None = None, reload_s: float = 2.0
    ):
        # sha256(key) -> tenant and expiry (a bare tenant name: a key that never expires)
        self._keys = {k: v if isinstance(v, _Key) else _Key(v) for k, v in keys.items()}
        self.path = path
        self.reload_s = reload_s
        self._stamp = _stamp(path) if path else None
        self._checked = time.monotonic()

    @classmethod
    def from_file(cls, path: Path, reload_s: float = 2.0) -> Tenants:
        return cls(dict(_parse(path)), path, reload_s)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        self._maybe_reload()
        key = _presented_key(metadata)
        if key is None:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        digest = key_hash(key)
        for known, entry in self._keys.items():
            if hmac.compare_digest(known, digest):
                if entry.expires_at is not None and time.time() >= entry.expires_at:
                    raise Unauthenticated("this API key has expired; ask for a new one")
                return entry.tenant
        raise Unauthenticated("invalid API key")

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.reload_s:
            return
        self._checked = now
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            self._keys = _parse(self.path)
            self._stamp = stamp
            log.info("tenants file %s reloaded: %d keys", self.path, len(self._keys))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "tenants file %s is not valid (%s); keeping the last good one", self.path, exc
            )


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


def _parse(path: Path) -> dict[str, _Key]:
    raw = json.loads(path.read_text())
    keys: dict[str, _Key] = {}
    for tenant in raw.get("tenants", []):
        name = tenant["name"]
        for digest in tenant.get("api_key_sha256", []):
            keys[digest.lower()] = _Key(name)
        for entry in tenant.get("api_keys", []):
            expires = entry.get("expires_at")
            keys[entry["sha256"].lower()] = _Key(name, float(expires) if expires else None)
    return keys


def _presented_key(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for name, value in metadata:
        if name not in ("authorization", "x-api-key"):
            continue  # other headers, binary (`-bin`) ones included, are not ours to decode
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                raise InvalidInput(f"the {name} header must be ASCII text") from None
        if name == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
        if name == "x-api-key":
            return value.strip()
    return None


def write_dev_tenant(path: Path, tenant: str, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"tenants": [{"name": tenant, "api_key_sha256": [key_hash(key)]}]}, indent=2)
    )
