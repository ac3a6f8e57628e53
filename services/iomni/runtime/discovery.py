"""Keeping the affinity router's `llm` replicas up to date from Kubernetes EndpointSlices.

The `llm` Service is headless; each ready pod is an endpoint in one of its EndpointSlices. We
list them, then watch for changes (re-listing when the watch expires), and hand the router the
set of ready `address:port`s. Outside Kubernetes the gateway uses a static list instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)
SERVICE_LABEL = "kubernetes.io/service-name"


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key, obj.get(_camel(key)))
    return getattr(obj, key, None)


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.title() for part in rest)


def slice_endpoints(endpoint_slice: Any, port_name: str, default_port: int) -> list[str]:
    """Ready, non-terminating `address:port`s of one EndpointSlice."""
    port = default_port
    for candidate in _get(endpoint_slice, "ports") or []:
        if _get(candidate, "name") == port_name and _get(candidate, "port"):
            port = int(_get(candidate, "port"))
    out = []
    for endpoint in _get(endpoint_slice, "endpoints") or []:
        conditions = _get(endpoint, "conditions") or {}
        if _get(conditions, "ready") is False or _get(conditions, "terminating") is True:
            continue
        for address in _get(endpoint, "addresses") or []:
            out.append(f"{address}:{port}")
    return out


class SliceTracker:
    """The current endpoints per slice name; `apply` takes a watch event."""

    def __init__(self, port_name: str = "grpc", default_port: int = 8001) -> None:
        self.port_name = port_name
        self.default_port = default_port
        self.slices: dict[str, list[str]] = {}

    def reset(self, slices: Iterable[Any]) -> None:
        self.slices = {
            _get(_get(s, "metadata"), "name"): slice_endpoints(s, self.port_name, self.default_port)
            for s in slices
        }

    def apply(self, event_type: str, endpoint_slice: Any) -> None:
        name = _get(_get(endpoint_slice, "metadata"), "name")
        if event_type == "DELETED":
            self.slices.pop(name, None)
        elif event_type in ("ADDED", "MODIFIED"):
            self.slices[name] = slice_endpoints(endpoint_slice, self.port_name, self.default_port)

    @property
    def replicas(self) -> list[str]:
        return sorted({e for endpoints in self.slices.values() for e in endpoints})


class EndpointSliceWatcher:
    def __init__(
        self,
        service: str,
        namespace: str,
        on_change: Callable[[list[str]], None],
        port_name: str = "grpc",
        default_port: int = 8001,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.on_change = on_change
        self.tracker = SliceTracker(port_name, default_port)
        self.stopped = False

    async def run(self) -> None:
        while not self.stopped:
            try:
                await asyncio.to_thread(self._list_and_watch)
            except Exception as exc:  # API server restarts, expired watches, RBAC errors
                log.warning("EndpointSlice watch of %s failed (%s); retrying", self.service, exc)
                await asyncio.sleep(2.0)

    def _list_and_watch(self) -> None:
        from kubernetes import client, config, watch

        config.load_incluster_config()
        api = client.DiscoveryV1Api()
        selector = f"{SERVICE_LABEL}={self.service}"
        listed = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
        self.tracker.reset(listed.items)
        self._publish()
        stream = watch.Watch().stream(
            api.list_namespaced_endpoint_slice,
            self.namespace,
            label_selector=selector,
            resource_version=listed.metadata.resource_version,
            timeout_seconds=300,
        )
        for event in stream:
            if self.stopped:
                return
            self.tracker.apply(event["type"], event["object"])
            self._publish()

    def _publish(self) -> None:
        replicas = self.tracker.replicas
        log.info("llm replicas: %s", replicas)
        self.on_change(replicas)
