"""Kafka: the asynchronous turn API (requests in, events out), dead letters, the event log."""
