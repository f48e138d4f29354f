"""Several gateway processes on one port: ``redserve gateway --gateway-processes N``.

One gateway process is one thread of Python: under bursts of new streams its
per-request work (HTTP parsing, validation, dispatch, the SSE machinery)
queues up while the machine's other cores idle. Gateways share nothing but
Redis (each has its own reply channel), so more of them is simply more
processes: this supervisor binds the listening socket once, starts N
gateways that accept on it (the kernel hands each connection to one of
them), restarts one that dies, and stops them all on SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from broker.settings import Settings
from redserve.serve import listen

log = logging.getLogger(__name__)


def gateway_command(log_level: str, fd: int) -> list[str]:
    return [sys.executable, "-m", "redserve", "gateway", "--log-level", log_level, "--listen-fd", str(fd)]


def spawn_gateway(settings: Settings, log_level: str, fd: int) -> subprocess.Popen[bytes]:
    """One gateway process accepting on the inherited socket ``fd``.

    In a session of its own, so a terminal's Ctrl-C reaches only the parent,
    which passes it on once (a second signal would mean "stop now").
    """
    env = os.environ | settings.model_copy(update={"gateway_processes": 1}).to_env()
    return subprocess.Popen(gateway_command(log_level, fd), env=env, pass_fds=[fd], start_new_session=True)


class GatewayGroup:
    def __init__(self, settings: Settings, log_level: str = "info") -> None:
        self.settings = settings
        self.log_level = log_level
        self.sock = listen(settings.host, settings.port)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def run(self) -> int:
        """Start the gateways and keep them running until a signal; returns 0 after a clean stop."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)
        n = self.settings.gateway_processes
        self.procs = [self._spawn() for _ in range(n)]
        started = [time.monotonic()] * n
        delay = [0.0] * n
        restart_at: list[float | None] = [None] * n
        log.info("%d gateway processes on http://%s:%d", n, self.settings.host, self.port)
        while not self.stopping:
            now = time.monotonic()
            for i, proc in enumerate(self.procs):
                if proc.poll() is None:
                    continue
                if restart_at[i] is None:  # just noticed: one that died young is retried ever more slowly
                    delay[i] = min(max(2 * delay[i], 0.5), 10.0) if now - started[i] < 10 else 0.0
                    restart_at[i] = now + delay[i]
                    log.warning("gateway process %d exited with %s; starting another in %.1f s",
                                proc.pid, proc.returncode, delay[i])
                elif now >= (restart_at[i] or now) and not self.stopping:
                    self.procs[i], started[i], restart_at[i] = self._spawn(), now, None
            time.sleep(0.1)
        return self._wait()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return spawn_gateway(self.settings, self.log_level, self.sock.fileno())

    def _stop(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def _wait(self) -> int:
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sock.close()
        return 0 if all(p.returncode == 0 for p in self.procs) else 1
