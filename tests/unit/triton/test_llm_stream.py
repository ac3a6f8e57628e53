"""The Triton transport's LLM stream against a fake Triton stream (no server): how it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from iomni.errors import Unavailable
from iomni.model.sampling import SamplingParams
from iomni.parts import GenerationRequest
from iomni.triton.client import TritonParts


class EndedStream:
    """A ModelStreamInfer stream that ends without the model's final response (a replica
    that went away between two responses, as tritonserver lets it)."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[object]:
        return self

    async def __anext__(self) -> object:
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class TwoReplicas:
    def __init__(self) -> None:
        self.routed: list[str] = []

    async def route(self, session_id: str) -> str:
        self.routed.append(f"replica-{len(self.routed)}:8001")
        return self.routed[-1]


def test_a_stream_that_ends_without_its_final_response_fails_on_another_replica() -> None:
    """Not a short reply that looks complete: the turn fails with Unavailable, and each retry
    is routed again (a draining replica leaves the ring), not sent back to the same one."""
    router = TwoReplicas()
    parts = TritonParts("unused:8001", "m", {}, retries=1, llm_router=router)
    streams: list[EndedStream] = []

    def stream_at(url: str):  # type: ignore[no-untyped-def]
        def call(requests, metadata=()):  # type: ignore[no-untyped-def]
            streams.append(EndedStream())
            return streams[-1]

        return call

    parts._model_stream_infer_at = stream_at  # type: ignore[method-assign]
    request = GenerationRequest([1, 2, 3], {}, SamplingParams(max_new_tokens=4), stop_ids=(7,))

    async def read() -> list[object]:
        return [step async for step in parts.generate(request)]

    with pytest.raises(Unavailable, match="ended before its final response"):
        asyncio.run(read())
    assert router.routed == ["replica-0:8001", "replica-1:8001"]
    assert len(streams) == 2 and all(stream.cancelled for stream in streams)
