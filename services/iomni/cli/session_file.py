"""A dialogue kept in a JSON file, with its media beside it, for `iomni chat --session`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from iomni.engine.cache import DirectoryEmbeddingCache, DirectoryMediaStore
from iomni.errors import InvalidInput
from iomni.model.conversation import Message
from iomni.turns.store import Lease, MemoryDialogueStore, SessionInfo, _Session

VERSION = 1


@dataclass
class SessionFile:
    path: Path
    messages: list[Message] = field(default_factory=list)

    @property
    def media_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".media")

    def media_store(self) -> DirectoryMediaStore:
        return DirectoryMediaStore(self.media_dir / "blobs")

    def embedding_cache(self) -> DirectoryEmbeddingCache:
        return DirectoryEmbeddingCache(self.media_dir / "embeddings")

    @classmethod
    def open(cls, path: Path) -> SessionFile:
        if not path.exists() or path.stat().st_size == 0:
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != VERSION:
                raise InvalidInput(
                    f"session file {path} has version {raw.get('version')!r}, expected {VERSION}"
                )
            return cls(path, [Message.from_dict(m) for m in raw["messages"]])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"session file {path} is not a valid iomni session: {exc}") from exc

    def append(self, user: Message, assistant: Message) -> None:
        self.messages += [user, assistant]

    def save(self) -> None:
        raw = {"version": VERSION, "messages": [m.to_dict() for m in self.messages]}
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.write_text(json.dumps(raw, indent=1, ensure_ascii=False) + "\n")
        os.replace(temp, self.path)


LOCAL_TENANT = "local"


class SessionFileStore(MemoryDialogueStore):
    """The turn core's `DialogueStore` over one session file: the embedded `iomni chat` keeps
    its dialogue on disk between runs, media and embeddings beside it."""

    def __init__(self, session: SessionFile, session_id: str = "local") -> None:
        super().__init__()
        self.session = session
        self.session_id = session_id
        self._sessions[session_id] = _Session(
            SessionInfo(session_id, LOCAL_TENANT, 0.0, len(session.messages) // 2),
            history=list(session.messages),
        )

    async def commit_turn(
        self, lease: Lease, turn_id: str, user: Message, assistant: Message, result: dict
    ) -> None:
        await super().commit_turn(lease, turn_id, user, assistant, result)
        self.session.messages = await self.history(LOCAL_TENANT, self.session_id)
        self.session.save()

    def media_store(self, scope: str = "") -> DirectoryMediaStore:
        return self.session.media_store()

    def embedding_cache(self, scope: str = "") -> DirectoryEmbeddingCache:
        return self.session.embedding_cache()
