"""What ``replica_acks`` (WAIT on every dispatch) costs: the same load through a Redis with one replica,
without and with waiting for the replica to hold each job.

    python -m bench.durability -c 1 64 -n 400

Prints one JSON line per (replica_acks, concurrency): TTFT and latency percentiles and tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from bench.loadgen import run
from bench.redserve_stack import redserve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("-n", "--requests", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=16)
    a = p.parse_args()
    for acks in (0, 1):
        with redserve(max_tokens=a.max_tokens, replicas=1, extra={"replica_acks": acks}) as st:
            for c in a.concurrency:
                asyncio.run(run(st.url, st.model, c, min(50, a.requests), a.max_tokens))  # warm up
                res = asyncio.run(run(st.url, st.model, c, max(a.requests, c), a.max_tokens, check_echo=True))
                print(json.dumps({"replica_acks": acks, "concurrency": c,
                                  **{k: round(v, 2) for k, v in res.summary().items()}}), flush=True)


if __name__ == "__main__":
    main()
