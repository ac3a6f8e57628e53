"""The offline tokenizer's id layout, round trips, streaming decode and loading errors."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import pytest

from iomni.errors import CheckpointError
from iomni.model import tokenizer as tk
from iomni.model.tokenizer import IncrementalDecoder, SpecialTokenIds, Tokenizer

EXPECTED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
    "<img>": 151669,
    "</img>": 151670,
    "<IMG_CONTEXT>": 151671,
    "<quad>": 151672,
    "</quad>": 151673,
    "<ref>": 151674,
    "</ref>": 151675,
    "<box>": 151676,
    "</box>": 151677,
    "<audio>": 151678,
    "</audio>": 151679,
    "<AUDIO_CONTEXT>": 151680,
}
NOT_SPECIAL = {t for t, i in EXPECTED_IDS.items() if 151657 <= i <= 151668}
FILLER_IDS = (5_000, 20_000, 77_777, 100_000, 151_642)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tk.write_offline_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def test_files_written(tok_dir: Path) -> None:
    names = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["model_max_length"] == 40960
    assert "<|im_start|>" in config["chat_template"]
    decoder = config["added_tokens_decoder"]
    for token, token_id in EXPECTED_IDS.items():
        assert decoder[str(token_id)]["content"] == token
        assert decoder[str(token_id)]["special"] is (token not in NOT_SPECIAL)


def test_special_token_ids(tok: Tokenizer) -> None:
    hf = tok.hf
    for token, token_id in EXPECTED_IDS.items():
        assert hf.convert_tokens_to_ids(token) == token_id, token
        assert tok.encode(token) == [token_id], token
    assert tok.special == SpecialTokenIds(
        im_start=151644,
        im_end=151645,
        endoftext=151643,
        img_start=151669,
        img_end=151670,
        img_context=151671,
        audio_start=151678,
        audio_end=151679,
        audio_context=151680,
    )
    assert tok.special.stop_ids == (151645, 151643)
    assert hf.eos_token_id == 151645
    assert hf.pad_token_id == 151643


def test_length_and_layout(tok: Tokenizer) -> None:
    assert len(tok) == 151681 == tk.OFFLINE_TOKENIZER_SIZE
    vocab = tok.hf.get_vocab()
    # Every id 0..151680 is used exactly once, so every string is unique.
    assert sorted(vocab.values()) == list(range(151681))
    byte_alphabet = [t for t, i in vocab.items() if i < 256]
    assert all(len(t) == 1 for t in byte_alphabet)


def test_english_round_trip(tok: Tokenizer) -> None:
    text = "The picture shows a red bicycle, 3 cats and a café!\nWhat's that sound?  Rain."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Trained merges make common English words cheaper than one token per byte.
    assert len(ids) < len(text.encode()) / 2


def test_round_trip_with_multimodal_tokens(tok: Tokenizer) -> None:
    text = "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image."
    ids = tok.encode(text)
    assert ids[:4] == [151669, 151671, 151671, 151670]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "\nDescribe the image."


def test_chatml_round_trip(tok: Tokenizer) -> None:
    text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids[0] == 151644 and ids.count(151645) == 1
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_chat_template(tok: Tokenizer) -> None:
    prompt = tok.hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_deterministic_bytes(tmp_path: Path, tok_dir: Path) -> None:
    tk._offline_tokenizer_json.cache_clear()  # retrain, not just rewrite the cached string
    tk.write_offline_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_filler_ids_decode_to_pseudo_words(tok: Tokenizer) -> None:
    for token_id in FILLER_IDS:
        word = tok.decode([token_id])
        assert re.fullmatch(r" [a-z]{6}", word), (token_id, word)
        # Fillers have no merges, so encoding their text never yields them.
        assert token_id not in tok.encode(word)
    words = {tok.decode([i]) for i in range(100_000, 100_500)}
    assert len(words) == 500


def test_incremental_decoder_multibyte(tok: Tokenizer) -> None:
    text = "héllo wörld 你好 🎉<|im_end|> done"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids) == "héllo wörld 你好 🎉 done"
    assert decoder.text == tok.decode(ids)
    # No piece ever exposes half a character.
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoder_random_ids(tok: Tokenizer) -> None:
    import random

    rng = random.Random(0)
    ids = [rng.randrange(len(tok)) for _ in range(300)] + [rng.randrange(256) for _ in range(40)]
    decoder = IncrementalDecoder(tok)
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == tok.decode(ids)


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        Tokenizer.from_dir(tmp_path / "does-not-exist")


def test_missing_multimodal_token(tmp_path: Path, tok_dir: Path) -> None:
    tokenizer_json = json.loads((tok_dir / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"] = [
        t for t in tokenizer_json["added_tokens"] if t["content"] != "<AUDIO_CONTEXT>"
    ]
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]["151680"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="<AUDIO_CONTEXT>"):
        Tokenizer.from_dir(tmp_path)


def test_loads_offline(tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(Tokenizer.from_dir(tok_dir)) == 151681


def test_plain_text_stays_plain_while_another_thread_encodes(tok: Tokenizer) -> None:
    """The Hugging Face tokenizer switches special-token splitting per call on shared state:
    prompts are built on a pool, so a user's typed placeholder must stay text even while
    another thread encodes template text with real special tokens."""
    placeholder = tok.special.img_context
    stop = threading.Event()

    def template_text() -> None:
        while not stop.is_set():
            tok.encode("<|im_start|>user\n<IMG_CONTEXT><|im_end|>")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between any two bytecodes
    other = threading.Thread(target=template_text)
    other.start()
    try:
        forged = sum(
            placeholder in tok.encode_plain("see <IMG_CONTEXT> here") for _ in range(20_000)
        )
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(switch)
    assert forged == 0
