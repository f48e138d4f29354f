"""The fault suite: real processes, real signals, real slow and vanishing clients.

Every test records what happened to its requests in the ledger; the table is
printed at the end of the run (fault, requests, ok, retried, clean errors,
lost, hung, and for faults that pause streams the longest client-visible
gap between two chunks, p50 and max over the streams).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

LEDGER = pytest.StashKey[list["Outcome"]]()


@dataclass
class Outcome:
    fault: str
    requests: int = 0
    ok: int = 0
    retried: int = 0
    clean_errors: int = 0
    lost: int = 0
    hung: int = 0
    notes: list[str] = field(default_factory=list)
    #: Each stream's longest gap between chunks (s), where the fault paused streams.
    pauses: list[float] = field(default_factory=list)

    @property
    def pause(self) -> str:
        if not self.pauses:
            return "-"
        ordered = sorted(self.pauses)
        return f"{ordered[len(ordered) // 2]:.2f} / {ordered[-1]:.2f}"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[LEDGER] = []


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(LEDGER, [])
    if not rows:
        return
    cols = ("fault", "requests", "ok", "retried", "clean errors", "lost", "hung", "pause p50 / max (s)")
    table = [cols] + [(o.fault, *(str(getattr(o, c.replace(" ", "_"))) for c in cols[1:-1]), o.pause) for o in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    terminalreporter.section("fault suite")
    for r in table:
        terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(r, widths)))


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Outcome:
    o = Outcome(fault=request.node.name.removeprefix("test_"))
    request.config.stash[LEDGER].append(o)
    return o
