"""Embeddings from any encoder or decoder: the mean of the last hidden states, L2-normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.hf.loading import LoadedModel
from workers.params import inputs_fit

#: Inputs embedded per forward pass, to bound memory on long input lists.
EMBED_CHUNK = 32


def mean_pooled(loaded: LoadedModel, texts: list[str]) -> tuple[list[list[float]], int]:
    """L2-normalised mean of the last hidden states (blocking); returns vectors and input tokens."""
    vectors: list[list[float]] = []
    tokens = 0
    with torch.inference_mode():
        for start in range(0, len(texts), EMBED_CHUNK):
            enc = loaded.tokenizer(texts[start:start + EMBED_CHUNK], padding=True, return_tensors="pt")
            inputs_fit(enc["input_ids"].shape[1], loaded.context_length)  # padded: the chunk's longest
            enc = enc.to(loaded.device)
            hidden = loaded.model.base_model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            vectors += F.normalize(mean, dim=-1).cpu().tolist()
            tokens += int(enc["attention_mask"].sum())
    return vectors, tokens

