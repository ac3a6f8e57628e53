"""A span per turn with a child per stage, and W3C context handed to the model transport."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from iomni.engine.parts import GenerationRequest, InProcessParts, LLMStep, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.telemetry.tracing import tracer

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(sdk)


class HeaderSpy(InProcessParts):
    headers: dict[str, str] = {}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]:
        HeaderSpy.headers = dict(request.trace_headers)
        async for step in super().generate(request):
            yield step


async def test_turn_span_has_a_child_per_stage(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buffer, "PNG")
    user = Message("user", (MediaPart.from_bytes("image", buffer.getvalue()), TextPart("hi")))
    engine = TurnEngine(HeaderSpy(tiny), processor)
    request = TurnRequest(
        user=user, params=SamplingParams(temperature=0.0, max_new_tokens=12), speech=SpeechOptions()
    )
    EXPORTER.clear()
    with tracer().start_as_current_span("turn") as turn:
        _ = [e async for e in engine.start(request).events()]
    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    assert {"turn", "vision_encode", "llm", "speech_decode"} <= set(spans)
    turn_id = turn.get_span_context().span_id
    for stage in ("vision_encode", "llm", "speech_decode"):
        assert spans[stage].parent.span_id == turn_id, stage
    llm = spans["llm"].get_span_context()
    traceparent = HeaderSpy.headers["traceparent"]
    assert f"{llm.trace_id:032x}" in traceparent and f"{llm.span_id:016x}" in traceparent
