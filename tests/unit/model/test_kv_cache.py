from __future__ import annotations

import torch
from transformers import DynamicCache

from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.kv_cache import as_growing


def test_a_prompt_prefilled_in_chunks_appends_in_place(tiny: LoadedCheckpoint) -> None:
    """The chunks' KV is the concatenating cache's, and after the first growth each chunk
    writes into the same storage instead of copying the prompt so far."""
    body = tiny.model.language_model.model
    embeds = torch.randn(
        1, 40, tiny.config.llm_hidden_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        plain = DynamicCache(config=tiny.model.language_model.config)
        grown = DynamicCache(config=tiny.model.language_model.config)
        stores = []
        for start in range(0, 40, 8):
            chunk = embeds[:, start : start + 8]
            plain = body(inputs_embeds=chunk, cache=plain, use_cache=True).cache
            grown = as_growing(body(inputs_embeds=chunk, cache=grown, use_cache=True).cache)
            stores.append(grown.layers[0].keys.untyped_storage().data_ptr())
    assert grown.get_seq_length() == plain.get_seq_length() == 40
    for mine, theirs in zip(grown.layers, plain.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.values, theirs.values)
    assert stores[2] == stores[3]  # 64 rows reserved at the second chunk: no copy after
    assert as_growing(grown) is grown
