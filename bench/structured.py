"""What constrained decoding costs per token: the transformers engine's tokens/s with and without a JSON schema.

    python -m bench.structured            # the tiny model, C = 1 and C = 8, 3 rounds each

Runs the engine itself (the compute thread and its batched decode step, no
broker). The schema keeps every sequence going to ``max_tokens`` (an array
of digits with more items than fit), so both runs generate exactly as many
tokens; their texts differ (digits against the random model's free
unicode), so the grammar's own cost is also timed alone: filling a
matcher's bitmask, masking a row of logits and accepting the token, per
token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from broker.protocol import Done, Generate, Structured
from workers.hf.engine import BatchEngine, ComputeThread
from workers.hf.grammar import Grammars
from workers.hf.loading import load_model
from workers.tiny_model import build_tiny_model

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1000}


def run(engine: BatchEngine, grammar: Any, concurrency: int, max_tokens: int, prompt: list[int]) -> float:
    """Tokens per second for ``concurrency`` sequences generated together."""
    done = threading.Semaphore(0)

    def emit(ev: Any) -> None:
        if isinstance(ev, (Done, BaseException)):
            done.release()

    params = Generate(prompt="x", max_tokens=max_tokens, temperature=0)
    before = engine.tokens_generated
    start = time.perf_counter()
    for _ in range(concurrency):
        engine.submit(prompt, params, emit, grammar)
    for _ in range(concurrency):
        done.acquire()
    return (engine.tokens_generated - before) / (time.perf_counter() - start)


def grammar_cost(grammar: Any, vocab: int, tokens: int = 2000) -> float:
    """Seconds of grammar work per token: fill the bitmask, mask one row of logits, accept a token."""
    import torch

    from workers.hf.grammar import Masks, matcher

    masks, m, spent, done = Masks(vocab), matcher(grammar), 0.0, 0
    logits = torch.zeros(1, vocab)
    while done < tokens:
        row = logits.clone()
        start = time.perf_counter()
        masks.apply(row, [(0, m)])
        token = int(row.argmax())
        m.accept_token(token)
        spent += time.perf_counter() - start
        done += 1
        if m.is_terminated():
            m = matcher(grammar)
    return spent / done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(build_tiny_model(Path(tmp), context_length=4096))
    thread = ComputeThread("bench-structured")
    engine = BatchEngine(loaded, thread)
    thread.start()
    grammar = Grammars(loaded.tokenizer, loaded.vocab_size).compile(Structured(json=json.dumps(SCHEMA)), "bench")
    prompt = list(loaded.tokenizer("Numbers, please:")["input_ids"])
    run(engine, grammar, 2, 16, prompt)  # warm up both paths
    run(engine, None, 2, 16, prompt)
    print(json.dumps({"grammar_us_per_token": round(grammar_cost(grammar, loaded.vocab_size) * 1e6, 1)}))
    for c in (1, 8):
        free = max(run(engine, None, c, args.max_tokens, prompt) for _ in range(args.rounds))
        held = max(run(engine, grammar, c, args.max_tokens, prompt) for _ in range(args.rounds))
        print(json.dumps({"concurrency": c, "free_tokens_per_s": round(free), "schema_tokens_per_s": round(held),
                          "ratio": round(held / free, 3)}))
    thread.close()


if __name__ == "__main__":
    main()
