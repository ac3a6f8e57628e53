"""EndpointSlice handling for the llm affinity ring (no API server: events are built here;
the watch itself is not exercised against a real kube-apiserver)."""

from __future__ import annotations

from iomni.runtime.discovery import EndpointSliceWatcher, SliceTracker, slice_endpoints


def endpoint_slice(name: str, endpoints: list[tuple[str, bool, bool]], port: int = 8001) -> dict:
    return {
        "metadata": {"name": name},
        "ports": [{"name": "http", "port": 8000}, {"name": "grpc", "port": port}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready, "terminating": terminating}}
            for ip, ready, terminating in endpoints
        ],
    }


def test_only_ready_endpoints_on_the_grpc_port() -> None:
    s = endpoint_slice(
        "llm-a",
        [("10.0.0.1", True, False), ("10.0.0.2", False, False), ("10.0.0.3", True, True)],
        port=9001,
    )
    assert slice_endpoints(s, "grpc", 8001) == ["10.0.0.1:9001"]


def test_watch_events_update_the_replicas() -> None:
    tracker = SliceTracker()
    tracker.reset([endpoint_slice("llm-a", [("10.0.0.1", True, False)])])
    assert tracker.replicas == ["10.0.0.1:8001"]
    tracker.apply("ADDED", endpoint_slice("llm-b", [("10.0.0.2", True, False)]))
    tracker.apply(
        "MODIFIED", endpoint_slice("llm-a", [("10.0.0.1", False, False), ("10.0.0.3", True, False)])
    )
    assert tracker.replicas == ["10.0.0.2:8001", "10.0.0.3:8001"]
    tracker.apply("DELETED", endpoint_slice("llm-b", []))
    assert tracker.replicas == ["10.0.0.3:8001"]
    tracker.apply("BOOKMARK", endpoint_slice("llm-c", [("10.0.0.9", True, False)]))
    assert tracker.replicas == ["10.0.0.3:8001"]


def test_client_objects_with_attributes_work_too() -> None:
    class Obj:
        def __init__(self, **kw: object) -> None:
            self.__dict__.update(kw)

    s = Obj(
        metadata=Obj(name="x"),
        ports=[Obj(name="grpc", port=7001)],
        endpoints=[Obj(addresses=["10.1.1.1"], conditions=Obj(ready=True, terminating=None))],
    )
    assert slice_endpoints(s, "grpc", 8001) == ["10.1.1.1:7001"]


def test_the_watcher_publishes_to_the_router() -> None:
    seen: list[list[str]] = []
    watcher = EndpointSliceWatcher("llm", "ns", seen.append)
    watcher.tracker.reset([endpoint_slice("llm-a", [("10.0.0.1", True, False)])])
    watcher._publish()
    assert seen == [["10.0.0.1:8001"]]
