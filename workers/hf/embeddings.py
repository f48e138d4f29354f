"""Embeddings from any encoder or decoder: the mean of the last hidden states, L2-normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.hf.loading import LoadedModel
from workers.params import in_vocabulary, inputs_fit

#: Inputs embedded per forward pass, to bound memory on long input lists.
EMBED_CHUNK = 32


def mean_pooled(loaded: LoadedModel, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
    """L2-normalised mean of the last hidden states (blocking); returns vectors and input tokens. An input is a
    text or its token ids."""
    vectors: list[list[float]] = []
    tokens = 0
    ids = [i if isinstance(i, list) else loaded.tokenizer(i)["input_ids"] for i in inputs]
    in_vocabulary((t for seq in ids for t in seq), loaded.vocab_size, "input")
    inputs_fit(max(map(len, ids)), loaded.context_length)
    with torch.inference_mode():
        for start in range(0, len(ids), EMBED_CHUNK):
            enc = loaded.tokenizer.pad({"input_ids": ids[start:start + EMBED_CHUNK]}, return_tensors="pt")
            enc = enc.to(loaded.device)
            hidden = loaded.model.base_model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            vectors += F.normalize(mean, dim=-1).cpu().tolist()
            tokens += int(enc["attention_mask"].sum())
    return vectors, tokens

