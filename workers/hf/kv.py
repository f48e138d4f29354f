"""The running sequences' KV cache as one left-padded batch."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def forward_parameters(model: Any) -> Mapping[str, inspect.Parameter]:
    """The keywords ``model``'s forward takes (a PEFT wrapper passes its own on: those of the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def cache_keyword(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache by: transformers 5.25 renamed ``past_key_values`` to
    ``cache`` (the old name is deprecated, to go in 5.40)."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


class KVBatch:
    """The running sequences' KV cache, left-padded to one length so one forward serves them all.

    Rows join after their own prefill (padded on the left to the batch's
    length) and leave when they finish; columns that became padding in every
    row are trimmed, so the cache stays as long as its longest live sequence.
    """

    def __init__(self, device: torch.device, cache_keyword: str = "past_key_values") -> None:
        self.device = device
        self.cache_keyword = cache_keyword
        self.clear()

    def clear(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # 1 = a real cached token
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # next position of each row
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # next input token of each row

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def add(self, cache: DynamicCache, length: int, tokens: list[int]) -> None:
        """Append ``len(tokens)`` rows that share one prefilled single-row ``cache`` of ``length`` tokens."""
        rows = len(tokens)
        _map_kv(cache, lambda t: t.expand(rows, *t.shape[1:]).contiguous())
        mask = torch.ones(rows, length, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], length)
            for old, new in zip(_layers(self.cache), _layers(cache)):
                old.keys = torch.cat([_pad_kv(_kv(old.keys), width), _pad_kv(_kv(new.keys), width)])
                old.values = torch.cat([_pad_kv(_kv(old.values), width), _pad_kv(_kv(new.values), width)])
            self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)])
        self.positions = torch.cat([self.positions, torch.full((rows,), length, device=self.device)])
        self.tokens = torch.cat([self.tokens, torch.tensor(tokens, dtype=torch.long, device=self.device)])

    def forward(self, model: Any, **extra: Any) -> torch.Tensor:
        """One decode step for every row; returns the next-token logits, one row each. ``extra`` goes to the
        model (each row's LoRA adapter, say)."""
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = model(input_ids=self.tokens[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                    use_cache=True, **{self.cache_keyword: self.cache}, **extra)
        self.mask, self.positions = mask, self.positions + 1
        return out.logits[:, -1].float()

    def set_tokens(self, tokens: list[int]) -> None:
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), then drop the columns no row uses any more."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        unused = int(self.mask.any(dim=0).long().argmax())  # leading all-padding columns
        self.mask = self.mask[:, unused:]
        assert self.cache is not None  # rows exist, so a cache does
        _map_kv(self.cache, lambda t: t[index, :, unused:])


def _map_kv(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = fn(_kv(layer.keys)), fn(_kv(layer.values))


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """A decoder's DynamicCache holds DynamicLayers (its type allows linear-attention and dummy ones too)."""
    return cast(list[DynamicLayer], cache.layers)


def _kv(t: torch.Tensor | None) -> torch.Tensor:
    """A filled DynamicLayer's keys or values: a tensor, though its type says it may be None."""
    assert t is not None
    return t


def _pad_kv(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[-2], 0))  # [batch, heads, seq, dim]: pad seq on the left


def _pad_mask(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (width - t.shape[-1], 0))

