"""Topic names and settings, and creating missing topics at startup (when allowed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class StreamSettings:
    bootstrap: str = "127.0.0.1:9092"
    requests_topic: str = "iomni.turns.requests"
    events_topic: str = "iomni.turns.events"
    dlq_topic: str = "iomni.turns.dlq"
    partitions: int = 6
    replication: int = 1
    create_topics: bool = True
    group_id: str = "iomni-turn-workers"
    session_timeout_ms: int = 10000
    max_in_flight: int = 4  # turns per worker before its partitions are paused
    busy_retry_s: float = 120.0  # how long a turn waits for its session's lease

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.requests_topic, self.events_topic, self.dlq_topic)


def ensure_topics(settings: StreamSettings) -> None:
    """Create the three topics if they are missing (no-op when they exist)."""
    if not settings.create_topics:
        return
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="iomni-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, settings.partitions, settings.replication)
            for name in settings.topics
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
                log.info("created topics %s", [t.name for t in missing])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
