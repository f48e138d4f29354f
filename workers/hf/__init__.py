"""HFWorker: serves a local Hugging Face model directory, batching whatever runs at the same time.

Why a hand-written decode loop rather than ``model.generate``: every request
must stream token by token, stop within one step when its client goes away,
and share *one* batched forward pass with every other running request
(continuous batching). One compute thread owns the model; the event loop only
tokenises, validates and relays events, so heartbeats and job reads never wait
on compute.

A directory whose architecture is not a causal LM (a BERT sentence encoder,
say) is served for embeddings only; chat and completions then answer 400.

The modules, in the order a request meets them: ``loading`` (a model
directory in memory), ``sampling`` (one token from one row of logits),
``text`` (token ids to text deltas), ``kv`` (the batched KV cache),
``engine`` (the compute thread), ``embeddings``, and ``worker``, which ties
them to the broker. Prompts and the context check are shared with the other
engines (``workers/prompts.py``, ``workers/params.py``).
"""

from workers.hf.engine import BatchEngine
from workers.hf.loading import LoadedModel, load_model
from workers.hf.text import IncrementalDecoder
from workers.hf.worker import HFWorker

__all__ = ["BatchEngine", "HFWorker", "IncrementalDecoder", "LoadedModel", "load_model"]
