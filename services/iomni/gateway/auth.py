"""Tenants and their API keys.

The tenants file holds SHA-256 hashes of keys, never the keys themselves:

    {"tenants": [{"name": "acme", "api_key_sha256": ["<hex>", ...]}]}

Clients send `authorization: Bearer <key>` (or `x-api-key: <key>`) in the call metadata.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from pathlib import Path

from iomni.errors import Unauthenticated

__all__ = ["Tenants", "Unauthenticated", "key_hash", "write_dev_tenant"]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Tenants:
    def __init__(self, hashes: dict[str, str]) -> None:
        self._by_hash = hashes  # sha256(key) -> tenant

    @classmethod
    def from_file(cls, path: Path) -> Tenants:
        raw = json.loads(path.read_text())
        hashes = {}
        for tenant in raw.get("tenants", []):
            for digest in tenant.get("api_key_sha256", []):
                hashes[digest.lower()] = tenant["name"]
        return cls(hashes)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        key = _presented_key(metadata)
        if key is None:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        digest = key_hash(key)
        for known, tenant in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise Unauthenticated("invalid API key")


def _presented_key(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for name, value in metadata:
        text = value.decode() if isinstance(value, bytes) else value
        if name == "authorization" and text.lower().startswith("bearer "):
            return text[7:].strip()
        if name == "x-api-key":
            return text.strip()
    return None


def write_dev_tenant(path: Path, tenant: str, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"tenants": [{"name": tenant, "api_key_sha256": [key_hash(key)]}]}, indent=2)
    )
