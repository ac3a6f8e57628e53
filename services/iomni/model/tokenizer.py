"""The text tokenizer: loading a checkpoint's tokenizer and building an offline one.

Generated checkpoints cannot download Qwen3's tokenizer, so `write_offline_tokenizer` builds a
byte-level BPE with the same id layout: ordinary tokens at 0..151642, Qwen3's special tokens at
151643..151668 and the InternVL/InteractiveOmni multimodal tokens after them. Real checkpoints
ship their own files; both load through `Tokenizer.from_dir`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from iomni.errors import CheckpointError

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
AUDIO_START_TOKEN = "<audio>"
AUDIO_END_TOKEN = "</audio>"
AUDIO_CONTEXT_TOKEN = "<AUDIO_CONTEXT>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# Qwen3's layout: 151643 ordinary tokens, then the added tokens below, in this order.
ORDINARY_VOCAB_SIZE = 151_643
_QWEN_SPECIAL = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_PLAIN = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
_MULTIMODAL_SPECIAL = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    AUDIO_START_TOKEN,
    AUDIO_END_TOKEN,
    AUDIO_CONTEXT_TOKEN,
)
OFFLINE_TOKENIZER_SIZE = (
    ORDINARY_VOCAB_SIZE + len(_QWEN_SPECIAL) + len(_QWEN_PLAIN) + len(_MULTIMODAL_SPECIAL)
)

# Qwen2/Qwen3's pre-tokenizer split, so offline token boundaries look like the real ones.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The trainer stops early once every corpus word is one token; this is only an upper bound.
_MAX_MERGES = 2_000
_CORPUS_RESOURCE = "tokenizer_corpus.txt"

# Filler words are three consonant+vowel syllables: 70**3 = 343000 candidates, enough for the
# ~150k filler ids. Stepping by a prime coprime to 343000 visits each candidate once and keeps
# neighbouring ids from reading alike.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
_FILLER_SPACE = len(_SYLLABLES) ** 3
_FILLER_STEP = 7_919

_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set content = message['content'] %}"
    "{%- else %}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt")
_MAX_HELD_TOKENS = 16


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens the prompt builder and the sampler need, resolved from the vocabulary."""

    im_start: int
    im_end: int
    endoftext: int
    img_start: int
    img_end: int
    img_context: int
    audio_start: int
    audio_end: int
    audio_context: int
    stop_ids: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", (self.im_end, self.endoftext))


_REQUIRED_TOKENS = {
    "im_start": IM_START,
    "im_end": IM_END,
    "endoftext": ENDOFTEXT,
    "img_start": IMG_START_TOKEN,
    "img_end": IMG_END_TOKEN,
    "img_context": IMG_CONTEXT_TOKEN,
    "audio_start": AUDIO_START_TOKEN,
    "audio_end": AUDIO_END_TOKEN,
    "audio_context": AUDIO_CONTEXT_TOKEN,
}


# ---------------------------------------------------------------------------------------------
# Building the offline tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet, in GPT-2/Qwen id order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    by_byte = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in by_byte:
            by_byte[b] = chr(256 + shift)
            shift += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [by_byte[b] for b in order]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _train_merges() -> list[tuple[str, str]]:
    corpus = resources.files("iomni.model").joinpath(_CORPUS_RESOURCE).read_text("utf-8")
    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + _MAX_MERGES,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    trainer_tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    return [(a, b) for a, b in merges]


def _filler_word(k: int) -> str:
    n = (k * _FILLER_STEP) % _FILLER_SPACE
    count = len(_SYLLABLES)
    return _SYLLABLES[n // count**2] + _SYLLABLES[(n // count) % count] + _SYLLABLES[n % count]


def _build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for symbol in _bytes_to_unicode():
        vocab[symbol] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    space = "\u0120"  # the byte-level symbol for " "
    k = 0
    while len(vocab) < ORDINARY_VOCAB_SIZE:
        # Skipping collisions keeps every string unique when a corpus word looks like a filler.
        vocab.setdefault(space + _filler_word(k), len(vocab))
        k += 1
    return vocab


def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
    )


@functools.cache
def _offline_tokenizer_json() -> str:
    merges = _train_merges()
    tok = HFTokenizer(
        models.BPE(
            vocab=_build_vocab(merges),
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            continuing_subword_prefix="",
            end_of_word_suffix="",
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.add_special_tokens([_added(t, True) for t in _QWEN_SPECIAL])
    tok.add_tokens([_added(t, False) for t in _QWEN_PLAIN])
    tok.add_special_tokens([_added(t, True) for t in _MULTIMODAL_SPECIAL])
    if tok.get_vocab_size(with_added_tokens=True) != OFFLINE_TOKENIZER_SIZE:
        raise AssertionError("offline tokenizer has the wrong size; the id layout is broken")
    return tok.to_str(pretty=False)


def _added_tokens_decoder() -> dict[str, dict[str, object]]:
    entries = [(t, True) for t in _QWEN_SPECIAL]
    entries += [(t, False) for t in _QWEN_PLAIN]
    entries += [(t, True) for t in _MULTIMODAL_SPECIAL]
    return {
        str(ORDINARY_VOCAB_SIZE + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(entries)
    }


def _tokenizer_config() -> dict[str, object]:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(),
        "bos_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 40960,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, object]:
    return {
        "additional_special_tokens": [*_QWEN_SPECIAL[1:], *_MULTIMODAL_SPECIAL],
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
    }


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_offline_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir.

    The output is byte-for-byte deterministic so generated checkpoints hash the same.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_offline_tokenizer_json(), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(_dump(_tokenizer_config()), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(_dump(_special_tokens_map()), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Loading and using a tokenizer


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )


def _resolve_special(hf: PreTrainedTokenizerBase, path: Path) -> SpecialTokenIds:
    ids: dict[str, int] = {}
    for name, token in _REQUIRED_TOKENS.items():
        token_id = hf.convert_tokens_to_ids(token)
        # Missing tokens come back as None or as the unk id; only a round trip proves presence.
        if not isinstance(token_id, int) or hf.convert_ids_to_tokens(token_id) != token:
            raise CheckpointError(
                f"tokenizer in {path} has no {token!r} token; InteractiveOmni needs it "
                "(use the checkpoint's own tokenizer files)"
            )
        ids[name] = token_id
    return SpecialTokenIds(**ids)


class Tokenizer:
    """A thin wrapper over a Hugging Face fast tokenizer with the ids the model needs."""

    def __init__(self, hf: PreTrainedTokenizerBase, special: SpecialTokenIds) -> None:
        self._hf = hf
        self._special = special
        # The Hugging Face tokenizer turns special-token splitting on and off per call, on
        # state it shares: an encode and an encode_plain on two threads at once (prompts are
        # built on the media pool) made a user's typed "<IMG_CONTEXT>" the real placeholder
        # in 12 of 20,000 calls. They take turns.
        self._encoding = threading.Lock()

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir() or not _has_tokenizer_files(path):
            raise CheckpointError(
                f"no tokenizer files in {path}; expected {' or '.join(_TOKENIZER_FILES)} "
                "with tokenizer_config.json"
            )
        try:
            hf = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
        except Exception as exc:  # any loader failure means the files are unusable
            raise CheckpointError(f"tokenizer in {path} could not be loaded: {exc}") from exc
        return cls(hf, _resolve_special(hf, path))

    @property
    def special(self) -> SpecialTokenIds:
        return self._special

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """The underlying Hugging Face tokenizer (for chat templates and the like)."""
        return self._hf

    def __len__(self) -> int:
        return len(self._hf)

    def encode(self, text: str) -> list[int]:
        """Token ids for text; special-token strings in it become their single ids."""
        with self._encoding:
            return list(self._hf.encode(text, add_special_tokens=False))

    def encode_plain(self, text: str) -> list[int]:
        """Token ids for untrusted text: `<IMG_CONTEXT>` typed by a user stays plain text.

        Without this a user could forge placeholders or turn boundaries in the prompt.
        """
        with self._encoding:
            return list(self._hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Cleanup would make decode(a + b) differ from decode(a) + decode(b) and break streaming.
        return self._hf.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text without splitting UTF-8 characters.

    Decodes a short window of recent ids and emits what it adds beyond the already-emitted part
    (the vLLM scheme), so the concatenated output equals decoding all ids at once.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        held = len(self._ids) - self._read_offset
        # A trailing U+FFFD is usually an incomplete UTF-8 sequence that later ids will finish;
        # the cap stops a stream of invalid bytes from being held back forever.
        if not final and new_text.endswith("\ufffd") and held < _MAX_HELD_TOKENS:
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._parts.append(delta)
        return delta
