"""All four models on a real `tritonserver` (the binary bundled in nvidia-pytriton)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from iomni.engine.events import AudioChunk, TurnDone
from iomni.engine.parts import GenerationRequest, InProcessParts, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.errors import Cancelled, InvalidInput, Unavailable
from iomni.model.checkpoint import LoadedCheckpoint, fingerprint
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.testing.speech import wav_bytes
from iomni.triton import client as triton_client
from iomni.triton.client import TritonParts
from iomni.triton.server import TritonServer
from iomni.triton.tensors import AUDIO_EMBEDS, IMAGE_EMBEDS
from tests.integration.conftest import free_ports
from tests.integration.prom import Scrape, delta

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def parts_for(triton: TritonServer, tiny_dir: Path, processor: Processor) -> TritonParts:
    special = processor.tokenizer.special
    return TritonParts(
        triton.grpc_url,
        fingerprint(tiny_dir),
        {special.img_context: IMAGE_EMBEDS, special.audio_context: AUDIO_EMBEDS},
    )


def metric(triton: TritonServer, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.ports.metrics}/metrics") as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def triton_parts(triton: TritonServer, tiny_dir: Path, processor: Processor) -> TritonParts:
    return parts_for(triton, tiny_dir, processor)


async def test_all_models_answer(
    triton_parts: TritonParts, tiny: LoadedCheckpoint, processor: Processor
) -> None:
    await triton_parts.check_ready()
    pixels = torch.randn(3, 3, 448, 448)
    remote = await triton_parts.encode_images(pixels)
    torch.testing.assert_close(remote, tiny.model.encode_images(pixels), atol=1e-4, rtol=1e-4)
    windows = [torch.randn(128, 3000), torch.randn(128, 100)]
    audio = await triton_parts.encode_audio(windows)
    assert [a.shape[0] for a in audio] == [750, 25]
    torch.testing.assert_close(
        audio[1], tiny.model.encode_audio(windows[1:])[0], atol=1e-4, rtol=1e-4
    )
    await triton_parts.close()


@pytest.mark.parametrize("off_loop", [False, True], ids=["llm-request-on-loop", "off-loop"])
async def test_turn_through_triton_equals_in_process(
    triton_parts: TritonParts,
    tiny: LoadedCheckpoint,
    processor: Processor,
    off_loop: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off the loop: the LLM request, built in the media pool as a large one is."""
    if off_loop:
        monkeypatch.setattr(triton_client, "OFFLOAD_BYTES", 0)
    image = MediaPart.from_bytes("image", _png())
    user = Message("user", (image, TextPart("What is in the picture?")))

    async def run(parts) -> tuple[str, bytes, TurnDone]:  # type: ignore[no-untyped-def]
        request = TurnRequest(
            user=user, params=GREEDY, speech=SpeechOptions(seed=3), turn_id="equal-1"
        )
        events = [e async for e in TurnEngine(parts, processor).start(request).events()]
        audio = b"".join(e.pcm for e in events if isinstance(e, AudioChunk))
        return events[-1].record[1].text, audio, events[-1]

    remote_text, remote_audio, remote_done = await run(triton_parts)
    local_text, local_audio, _ = await run(InProcessParts(tiny))
    assert remote_text == local_text
    assert remote_done.usage.completion_tokens == GREEDY.max_new_tokens
    assert len(remote_audio) == len(local_audio) > 0
    a = np.frombuffer(remote_audio, "<i2").astype(np.float32)
    b = np.frombuffer(local_audio, "<i2").astype(np.float32)
    assert np.abs(a - b).max() <= 64  # PCM16 steps: float noise from thread counts only
    await triton_parts.close()


async def test_a_cloned_voice_through_triton_sounds_as_in_process(
    triton_parts: TritonParts, tiny: LoadedCheckpoint, processor: Processor
) -> None:
    """A reply in the voice of a reference clip (the speaker embedded as its first request
    arrives), as the embedded engine renders it; a clip that is not audio is invalid input."""
    user = Message("user", (TextPart("Say something"),))

    async def run(parts, reference: bytes) -> bytes:  # type: ignore[no-untyped-def]
        speech = SpeechOptions(speaker_wav=reference, seed=3)
        request = TurnRequest(user=user, params=GREEDY, speech=speech, turn_id="voice-1")
        events = [e async for e in TurnEngine(parts, processor).start(request).events()]
        return b"".join(e.pcm for e in events if isinstance(e, AudioChunk))

    reference = wav_bytes(np.sin(np.arange(16000) / 9.0).astype(np.float32) * 0.3, 16000)
    remote, local = await run(triton_parts, reference), await run(InProcessParts(tiny), reference)
    default = await run(triton_parts, b"")
    assert len(remote) == len(local) > 0 and remote != default
    a = np.frombuffer(remote, "<i2").astype(np.float32)
    b = np.frombuffer(local, "<i2").astype(np.float32)
    assert np.abs(a - b).max() <= 64
    with pytest.raises(InvalidInput, match="speaker"):
        await run(triton_parts, b"not audio at all")
    await triton_parts.close()


async def test_cancelling_a_stream_stops_decoding_on_the_server(
    triton: TritonServer, triton_parts: TritonParts
) -> None:
    before = metric(triton, "iomni_llm_cancelled_total")
    request = GenerationRequest(
        input_ids=list(range(100, 140)),
        media={},
        params=SamplingParams(temperature=0.0, max_new_tokens=4000),
        stop_ids=[],
        return_hidden=False,
    )
    stream = triton_parts.generate(request)
    received = 0
    async for _ in stream:
        received += 1
        if received == 5:
            break
    await stream.aclose()
    for _ in range(50):
        if metric(triton, "iomni_llm_cancelled_total") > before:
            break
        await asyncio.sleep(0.1)
    assert metric(triton, "iomni_llm_cancelled_total") == before + 1
    generated = metric(triton, "iomni_llm_generated_tokens_total")
    await asyncio.sleep(0.5)
    assert metric(triton, "iomni_llm_generated_tokens_total") == generated  # nothing running
    await triton_parts.close()


async def test_concurrent_streams_share_decode_steps(
    triton: TritonServer, triton_parts: TritonParts
) -> None:
    async def stream(seed: int) -> list[int]:
        request = GenerationRequest(
            input_ids=[1000 + seed] * (10 + seed),
            media={},
            params=SamplingParams(temperature=0.0, max_new_tokens=40),
            stop_ids=[],
            return_hidden=False,
        )
        return [s.token_id async for s in triton_parts.generate(request)]

    url = f"http://127.0.0.1:{triton.ports.metrics}/metrics"
    before = Scrape(url)
    results = await asyncio.gather(*(stream(i) for i in range(4)))
    after = Scrape(url)
    assert all(len(r) == 40 for r in results)
    steps = delta(before, after, "iomni_llm_step_sequences_count")
    single = delta(before, after, "iomni_llm_step_sequences_bucket", le="1")
    sequences = delta(before, after, "iomni_llm_step_sequences_sum")
    # 160 tokens in fewer steps than tokens: decode steps carried several sequences at once.
    assert sequences == 160 and steps < 160 and steps - single > 0
    await triton_parts.close()


async def test_second_turn_of_a_session_hits_the_kv_cache(
    triton: TritonServer, triton_parts: TritonParts, processor: Processor
) -> None:
    engine = TurnEngine(triton_parts, processor)
    hits = metric(triton, "iomni_llm_kv_cache_hits_total")
    first = [
        e
        async for e in engine.start(
            TurnRequest(
                user=Message("user", (TextPart("first question"),)),
                params=GREEDY,
                session_id="kv-session",
            )
        ).events()
    ][-1]
    second = [
        e
        async for e in engine.start(
            TurnRequest(
                user=Message("user", (TextPart("second question"),)),
                history=list(first.record),
                params=GREEDY,
                session_id="kv-session",
            )
        ).events()
    ][-1]
    assert second.usage.prompt_tokens_reused > 20  # system prompt + the first exchange
    assert metric(triton, "iomni_llm_kv_cache_hits_total") == hits + 1
    await triton_parts.close()


async def test_interleaved_speech_sequences_do_not_mix(
    triton_parts: TritonParts, tiny: LoadedCheckpoint
) -> None:
    width = tiny.config.llm_hidden_size
    g = torch.Generator().manual_seed(0)
    texts = {
        k: (
            torch.randint(0, 150000, (10,), generator=g).tolist(),
            torch.randn(10, width, generator=g),
        )
        for k in "ab"
    }

    async def alone(key: str) -> np.ndarray:
        speech = await triton_parts.open_speech(SpeechOptions(seed=1, sequence_id=f"alone-{key}"))
        ids, hidden = texts[key]
        chunks = await speech.push_text(ids[:5], hidden[:5])
        chunks += await speech.push_text(ids[5:], hidden[5:])
        arrived: list[np.ndarray] = []
        tail = await speech.finish(arrived.append)
        # The decoder sends the tail chunk by chunk, each handed on as it arrives.
        assert len(tail) >= 2 and all(x is y for x, y in zip(arrived, tail, strict=True))
        return np.concatenate(chunks + tail)

    expected = {k: await alone(k) for k in "ab"}
    a = await triton_parts.open_speech(SpeechOptions(seed=1, sequence_id="mix-a"))
    b = await triton_parts.open_speech(SpeechOptions(seed=1, sequence_id="mix-b"))
    got: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for start in (0, 5):
        for key, speech in (("a", a), ("b", b)):
            ids, hidden = texts[key]
            got[key] += await speech.push_text(ids[start : start + 5], hidden[start : start + 5])
    got["b"] += await b.finish()
    got["a"] += await a.finish()
    for key in "ab":
        np.testing.assert_allclose(np.concatenate(got[key]), expected[key], atol=1e-6)
    assert not np.allclose(expected["a"][:1000], expected["b"][:1000])
    await triton_parts.close()


async def test_speech_state_is_freed_at_end_and_on_barge_in(
    triton: TritonServer, triton_parts: TritonParts, tiny: LoadedCheckpoint
) -> None:
    hidden = torch.randn(5, tiny.config.llm_hidden_size)
    speech = await triton_parts.open_speech(SpeechOptions(sequence_id="free-1"))
    await speech.push_text(list(range(5)), hidden)
    assert metric(triton, "iomni_speech_open_sequences") == 1
    await speech.close()  # barge-in: discarded without rendering, in the background
    deadline = asyncio.get_running_loop().time() + 10
    while metric(triton, "iomni_speech_open_sequences") != 0:
        assert asyncio.get_running_loop().time() < deadline, "the sequence was never freed"
        await asyncio.sleep(0.05)
    speech = await triton_parts.open_speech(SpeechOptions(sequence_id="free-2"))
    await speech.push_text(list(range(5)), hidden)
    assert await speech.finish()
    assert metric(triton, "iomni_speech_open_sequences") == 0
    await triton_parts.close()


async def test_pipelined_text_is_answered_in_order_and_a_discard_supersedes_it(
    triton: TritonServer, triton_parts: TritonParts, tiny: LoadedCheckpoint
) -> None:
    """A reply's groups sent without waiting (one stream, as the engine does) give the audio
    of groups sent one by one; a barge-in answers the text still queued as cancelled."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 150000, (50,), generator=g).tolist()
    hidden = torch.randn(50, tiny.config.llm_hidden_size, generator=g)
    groups = [(ids[i : i + 5], hidden[i : i + 5]) for i in range(0, 50, 5)]

    serial = await triton_parts.open_speech(SpeechOptions(seed=1, sequence_id="serial"))
    expected = [await serial.push_text(*group) for group in groups] + [await serial.finish()]
    piped = await triton_parts.open_speech(SpeechOptions(seed=1, sequence_id="piped"))
    calls = [asyncio.ensure_future(piped.push_text(*group)) for group in groups]
    calls.append(asyncio.ensure_future(piped.finish()))
    got = await asyncio.wait_for(asyncio.gather(*calls), 120)
    assert [len(chunks) for chunks in got] == [len(chunks) for chunks in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)

    barged = await triton_parts.open_speech(SpeechOptions(seed=1, sequence_id="barged"))
    calls = [asyncio.ensure_future(barged.push_text(*group)) for group in groups]
    await calls[0]
    await barged.close()
    rest = await asyncio.wait_for(asyncio.gather(*calls[1:], return_exceptions=True), 60)
    assert any(isinstance(r, Cancelled) for r in rest), rest
    assert all(isinstance(r, (list, Cancelled)) for r in rest), rest
    deadline = asyncio.get_running_loop().time() + 10
    while metric(triton, "iomni_speech_open_sequences") != 0:
        assert asyncio.get_running_loop().time() < deadline, "the sequence was never freed"
        await asyncio.sleep(0.05)
    await triton_parts.close()


async def test_concurrent_replies_decode_together_and_sound_as_if_alone(
    triton: TritonServer, triton_parts: TritonParts, tiny: LoadedCheckpoint
) -> None:
    """Replies whose text waits at the decoder together are decoded in one pass, their first
    chunks' flow rendered in one pass (the batch histograms prove both), and each gets the
    audio it gets alone."""
    g = torch.Generator().manual_seed(3)
    width = tiny.config.llm_hidden_size
    texts = [
        (torch.randint(0, 150000, (n,), generator=g).tolist(), torch.randn(n, width, generator=g))
        for n in (20, 15, 25, 20)
    ]

    async def speak(reply: int, sequence_id: str) -> list[np.ndarray]:
        speech = await triton_parts.open_speech(SpeechOptions(seed=reply, sequence_id=sequence_id))
        ids, hidden = texts[reply]
        calls = [
            asyncio.ensure_future(speech.push_text(ids[i : i + 5], hidden[i : i + 5]))
            for i in range(0, len(ids), 5)
        ]
        calls.append(asyncio.ensure_future(speech.finish()))
        return [chunk for chunks in await asyncio.gather(*calls) for chunk in chunks]

    alone = [await speak(reply, f"alone-{reply}") for reply in range(len(texts))]
    passes = metric(triton, "iomni_speech_decode_batch_replies_count")
    replies = metric(triton, "iomni_speech_decode_batch_replies_sum")
    first_chunk_passes = metric(triton, "iomni_speech_first_chunk_batch_replies_count")
    together = await asyncio.wait_for(
        asyncio.gather(*(speak(reply, f"together-{reply}") for reply in range(len(texts)))), 120
    )
    passes = metric(triton, "iomni_speech_decode_batch_replies_count") - passes
    replies = metric(triton, "iomni_speech_decode_batch_replies_sum") - replies
    assert replies > passes, f"{replies} replies in {passes} passes: nothing was batched"
    first_chunk_passes = (
        metric(triton, "iomni_speech_first_chunk_batch_replies_count") - first_chunk_passes
    )
    assert first_chunk_passes >= 1, "no first chunks were rendered together"
    # The batched flow's float rounding (mel ~1e-6) reaches the waveform through the
    # vocoder's sine phase, a running sum (docs/speech.md).
    for mine, theirs in zip(together, alone, strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-3)
    await triton_parts.close()


def test_wrong_shapes_and_dtypes_are_invalid_argument(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    cases = [
        ("vision_encoder", "PIXEL_VALUES", np.zeros((1, 3, 224, 224), np.float32), "FP32"),
        ("vision_encoder", "PIXEL_VALUES", np.zeros((1, 3, 448, 448), np.float64), "FP64"),
        ("audio_encoder", "MEL", np.zeros((1, 80, 100), np.float32), "FP32"),
        ("audio_encoder", "MEL", np.zeros((1, 128, 4000), np.float32), "FP32"),
    ]
    for model, name, array, dtype in cases:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        with pytest.raises(Exception) as info:
            client.infer(model, [tensor])
        assert "INVALID_ARGUMENT" in str(info.value.status()), str(info.value)
        assert re.search(r"(shape|data-type|frames|128)", info.value.message())


async def test_invalid_llm_request_is_a_clear_error(triton_parts: TritonParts) -> None:
    request = GenerationRequest(input_ids=[151671, 151671], media={}, params=GREEDY, stop_ids=[])
    with pytest.raises(InvalidInput, match="Triton model 'llm'.*2 placeholders"):
        async for _ in triton_parts.generate(request):
            pass
    await triton_parts.close()


async def test_the_requests_stop_ids_end_the_reply(triton_parts: TritonParts) -> None:
    """The stop tokens a caller names end the reply on the server as in process (they used
    to be replaced by the tokenizer's own); ids outside the vocabulary are refused."""

    async def reply(stop_ids: list[int]) -> list[int]:
        request = GenerationRequest([1000] * 12, {}, GREEDY, stop_ids, return_hidden=False)
        return [step.token_id async for step in triton_parts.generate(request)]

    free = await reply([])
    assert len(free) == GREEDY.max_new_tokens
    stop = free[3]
    assert await reply([stop]) == free[: free.index(stop) + 1]
    with pytest.raises(InvalidInput, match="stop_ids must be token ids below the vocabulary"):
        await reply([-1])
    await triton_parts.close()


async def test_model_not_ready_is_named(triton: TritonServer, triton_parts: TritonParts) -> None:
    with pytest.raises(Unavailable, match="not ready: no_such_model"):
        await triton_parts.check_ready(["llm", "no_such_model"])
    await triton_parts.close()


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (600, 400), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_a_part_without_a_server_is_unavailable_naming_the_model() -> None:
    """Encoder and LLM requests go out pre-serialized on a channel of their own: a server that
    is not there is still the project's Unavailable, after the retries, naming the model."""
    port = free_ports(1)[0]
    parts = TritonParts(f"127.0.0.1:{port}", "tiny", {}, timeout_s=5, retries=1)
    try:
        with pytest.raises(Unavailable, match="Triton model 'vision_encoder'"):
            await parts.encode_images(torch.randn(3, 3, 448, 448))
        with pytest.raises(Unavailable, match="Triton model 'audio_encoder'"):
            await parts.encode_audio([torch.randn(128, 100)])
        request = GenerationRequest(input_ids=[1, 2], media={}, params=GREEDY, stop_ids=[])
        with pytest.raises(Unavailable, match="Triton model 'llm'"):
            [step async for step in parts.generate(request)]
    finally:
        await parts.close()


async def test_static_headers_in_any_case_go_out_with_preserialized_requests(
    triton: TritonServer, tiny: LoadedCheckpoint
) -> None:
    """gRPC refuses metadata keys with capitals; tritonclient lowers them, and so must the
    pre-serialized encoder and LLM requests, or a configured header breaks every turn."""
    parts = TritonParts(triton.grpc_url, "tiny", {}, headers={"X-Iomni-Caller": "test"})
    try:
        pixels = torch.randn(1, 3, 448, 448)
        rows = await parts.encode_images(pixels)
        torch.testing.assert_close(rows, tiny.model.encode_images(pixels), atol=1e-4, rtol=1e-4)
        request = GenerationRequest(
            input_ids=[1, 2, 3],
            media={},
            params=GREEDY,
            stop_ids=[],
            trace_headers={"Traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        )
        steps = [step async for step in parts.generate(request)]
        assert len(steps) == GREEDY.max_new_tokens
    finally:
        await parts.close()


def _resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


async def test_finished_llm_streams_leave_nothing_in_tritonserver(
    triton: TritonServer, triton_parts: TritonParts
) -> None:
    """A reply's stream is read to its end once its final response is in, never cancelled
    then: tritonserver 2.51 keeps a stream cancelled in the window before its own end (these
    600 replies grew it by 15.6 MB when the client cancelled). Its resident memory may move a
    little, not grow with the replies."""

    async def replies(count: int, offset: int) -> None:
        for i in range(count):
            request = GenerationRequest(
                input_ids=[1000 + offset, 1100 + i % 50],
                media={},
                params=SamplingParams(temperature=0.0, max_new_tokens=48),
                stop_ids=[],
                return_hidden=False,
            )
            async for _ in triton_parts.generate(request):
                pass

    assert triton.process is not None
    await asyncio.gather(*(replies(20, n) for n in range(4)))  # pools and caches warm
    before = _resident_mb(triton.process.pid)
    await asyncio.gather(*(replies(150, n) for n in range(4)))
    await asyncio.sleep(0.5)  # the last streams' ends are read in the background
    grown = _resident_mb(triton.process.pid) - before
    assert grown < 3.0, f"tritonserver grew {grown:.1f} MB over 600 replies"
    await triton_parts.close()
