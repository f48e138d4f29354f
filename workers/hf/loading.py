"""Loading a Hugging Face model directory: tokenizer, model, device, and what serving it must know.

A directory whose architecture is not a causal LM (a BERT sentence encoder,
say) loads for embeddings only.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

#: Architecture name endings that mean "decoder-only LM we can generate with".
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class LoadedModel:
    """A model directory in memory, with what serving it needs to know."""

    path: Path
    tokenizer: Any
    model: Any
    causal: bool
    device: torch.device
    #: Longest prompt + completion (or embedding input) in tokens.
    context_length: int
    eos_ids: frozenset[int] = frozenset()
    #: LoRA adapters loaded onto the model (it is then a PeftModel), by name.
    adapters: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits (a tokenizer may know fewer tokens)."""
        return int(self.model.config.vocab_size)


def with_adapters(loaded: LoadedModel, adapters: dict[str, str]) -> LoadedModel:
    """``loaded`` with each LoRA adapter (name -> PEFT adapter directory) loaded once (blocking)."""
    if not adapters:
        return loaded
    if not loaded.causal:
        raise ValueError("LoRA adapters need a causal LM to generate with")
    from peft import PeftModel

    (first, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(loaded.model, first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    loaded.model, loaded.adapters = model.eval(), dict(adapters)
    return loaded


def is_causal_lm(config: Any) -> bool:
    return any(a.endswith(CAUSAL_SUFFIXES) for a in getattr(config, "architectures", None) or [])


@dataclass(frozen=True)
class LoadOptions:
    """How to load: ``--device``, ``--dtype``, ``--max-model-len``, ``--load-in``."""

    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    load_in: str | None = None


def load_model(path: Path, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load tokenizer and model (blocking: call it in a thread). Options the machine cannot honour (a GPU that
    is not there, quantization without bitsandbytes) are refused with a clear error before anything loads."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    kwargs, device = _placement(options)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    causal = is_causal_lm(config)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # batched embedding pads; any token will do under the mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model_cls = AutoModelForCausalLM if causal else AutoModel
    model = model_cls.from_pretrained(path, local_files_only=True, dtype=options.dtype, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to() reads as taking a model
    model = model.eval()
    context = model_context_length(path, config, tokenizer)
    if options.max_model_len is not None:
        if options.max_model_len > context:
            raise ValueError(f"--max-model-len {options.max_model_len} is over {path.name}'s own {context}")
        context = options.max_model_len
    return LoadedModel(
        path=path, tokenizer=tokenizer, model=model, causal=causal, device=model.device,
        context_length=context,
        eos_ids=frozenset(_ids(getattr(config, "eos_token_id", None), tokenizer.eos_token_id,
                               getattr(getattr(model, "generation_config", None), "eos_token_id", None))),
    )


def _placement(options: LoadOptions) -> tuple[dict[str, Any], torch.device]:
    """``from_pretrained`` arguments and the device for ``options``; what cannot work here is a ValueError."""
    gpus = torch.cuda.device_count()
    if options.load_in is not None:
        if importlib.util.find_spec("bitsandbytes") is None or not gpus:
            raise ValueError(f"--load-in {options.load_in} needs a CUDA GPU and the bitsandbytes package "
                             "(pip install bitsandbytes)")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_8bit=options.load_in == "8bit", load_in_4bit=options.load_in == "4bit")
        return {"quantization_config": quant, "device_map": "auto"}, torch.device("cuda")
    if options.device == "auto":
        if gpus > 1 and importlib.util.find_spec("accelerate") is not None:
            return {"device_map": "auto"}, torch.device("cuda")
        return {}, torch.device("cuda" if gpus else "cpu")
    device = torch.device(options.device)
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise ValueError(f"--device {options.device}: this machine has {gpus} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no Apple GPU here")
    return {}, device


def model_context_length(path: Path, config: Any, tokenizer: Any) -> int:
    """The model's window; a sentence-transformers directory may declare a shorter one it was trained for."""
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        declared = json.loads(st_config.read_text()).get("max_seq_length")
        if declared:
            return int(declared)
    for n in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(n, int) and 0 < n < 10**7:  # tokenizers say 1e30 when they do not know
            return n
    raise ValueError(f"cannot tell the context length of {path}: no max_position_embeddings in config.json")


def _ids(*values: int | list[int] | None) -> Iterable[int]:
    for v in values:
        if isinstance(v, int):
            yield v
        elif v:
            yield from v

