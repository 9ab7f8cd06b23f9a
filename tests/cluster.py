"""A real multi-node Ray cluster on one machine: a head and worker nodes, each a ``ray start --block`` process.

Every node is its own process group (so a test can kill one node outright, raylet and workers together) and
gets its own ports. Every node gets a temp dir of its own: Ray resolves a driver's cluster through
``<temp_dir>/ray_current_cluster``, which under the shared ``/tmp/ray`` names whichever cluster on this machine
started last. Drivers are given explicit addresses (``gcs_address`` for ``ray.init``, ``dashboard`` for job
submission). Used by ``tests/test_multinode.py`` and ``bench/scaling.py``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from services.launcher import free_port

# A killed node is declared dead after period × threshold (Ray's defaults take ~15 s): the head's GCS reads these.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4",
                          "RAY_health_check_initial_delay_ms": "0"}


def _ray_cli() -> str:
    ray = Path(sys.executable).with_name("ray")
    return str(ray) if ray.exists() else "ray"


class NodeExited(RuntimeError):
    """A node process that was starting exited (``ray start`` gave up on it)."""


class Node:
    """One ``ray start --block`` process (head or worker) in a process group of its own."""

    def __init__(self, cmd: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.log = log

    def kill(self) -> None:
        """SIGKILL the node's whole process group: raylet, object store and its workers die at once (a crash)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (``ray start --block`` then stops its processes); SIGKILL whatever is left after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (workers the raylet left)
        self.proc.wait()


class LocalCluster:
    """A head and ``add_node()`` workers on this machine, each with ``num_cpus`` CPUs.

    Args:
        work: directory for the nodes' logs.
        num_cpus: CPUs of each node (what Ray may schedule there).
        cwd: working directory of the nodes, and so of job drivers.
        env: extra environment of every node (and of what runs there), e.g. S3 credentials.
        token: the cluster's auth token (default: a fresh one). A driver in this process must have it in
            ``RAY_AUTH_TOKEN`` (and ``RAY_AUTH_MODE=token``) before it imports ray.
    """

    def __init__(self, work: Path, *, num_cpus: int = 1, cwd: Path | None = None,
                 env: dict[str, str] | None = None, token: str | None = None) -> None:
        self.work, self.num_cpus, self.cwd = work, num_cpus, cwd or Path.cwd()
        work.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-mn-"))  # short: Ray's Unix socket paths
        # Token authentication, as a real cluster (and the service's embedded head) runs it, with a token of its
        # own: drivers get it through driver_env (Ray otherwise falls back to ~/.ray/auth_token).
        self.token = token or secrets.token_hex(32)
        self.driver_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | dict(env or {})
        self.driver_env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.env = self.driver_env | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0",
                                      # Jobs' drivers run here: Ray Data then starts work once every actor is up,
                                      # instead of handing all shards to the first one (node starts are skewed).
                                      "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        from ray._private.services import get_node_ip_address

        # The address Ray itself gives this machine's nodes (it resolves 127.0.0.1 to it too).
        self.gcs_address = f"{get_node_ip_address()}:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.head: Node | None = None
        self.workers: list[Node] = []

    def _common(self) -> list[str]:
        return ["--block", "--disable-usage-stats", f"--num-cpus={self.num_cpus}",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def start(self, workers: int = 1, timeout: float = 120, attempts: int = 3) -> LocalCluster:
        """Start the head (again, up to ``attempts`` times, if ``ray start`` gives up on it), then ``workers``."""
        for attempt in range(attempts):
            cmd = [_ray_cli(), "start", "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                   f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}", *self._common()]
            head = Node(cmd, env=self.env | FAST_FAILURE_DETECTION, log=self.work / f"head-{attempt}.log",
                        cwd=self.cwd)
            try:
                self.wait_nodes(1, timeout, starting=head)
            except NodeExited:
                head.stop()
                continue
            self.head = head
            break
        else:
            raise RuntimeError(f"the Ray head failed to start {attempts} times; logs in {self.work}")
        for _ in range(workers):
            self.add_node(timeout=timeout)
        return self

    def add_node(self, timeout: float = 120, attempts: int = 3) -> Node:
        """Start a worker node and wait until the cluster counts it.

        ``ray start`` gives a raylet 30 s (fixed in Ray) to register with the GCS and exits when it does not, which
        happens on a loaded machine: such a node is started again, up to ``attempts`` times.
        """
        expected = len(self.alive_nodes()) + 1
        for attempt in range(attempts):
            # A temp dir of its own too: every node writes <temp_dir>/ray_current_cluster, /tmp/ray's is shared.
            name = f"w{len(self.workers)}-{attempt}"
            cmd = [_ray_cli(), "start", f"--address={self.gcs_address}", f"--temp-dir={self.temp_dir}/{name}",
                   *self._common()]
            node = Node(cmd, env=self.env, log=self.work / f"worker-{name}.log", cwd=self.cwd)
            try:
                self.wait_nodes(expected, timeout, starting=node)
            except NodeExited:
                node.stop()
                continue
            self.workers.append(node)
            return node
        raise RuntimeError(f"a worker node failed to start {attempts} times; logs in {self.work}")

    def alive_nodes(self) -> list[dict]:
        """Ray's state API (the dashboard's ``/api/v0/nodes``): the alive nodes; [] while it does not answer."""
        try:
            r = httpx.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 1000, "detail": "true"}, timeout=5,
                          headers={"Authorization": f"Bearer {self.token}"})
            nodes = r.json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 120, starting: Node | None = None) -> list[dict]:
        """Wait until exactly ``n`` nodes are alive (also: until a killed one is declared dead).

        Raises:
            NodeExited: ``starting`` (a node being started) exited before ``n`` nodes were alive.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.head is not None and self.head.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited; see {self.head.log}")
            if starting is not None and starting.proc.poll() is not None:
                raise NodeExited(f"a starting node exited; see {starting.log}")
            nodes = self.alive_nodes()
            if len(nodes) == n:
                return nodes
            time.sleep(0.5)
        raise RuntimeError(f"{n} alive Ray nodes expected, {len(self.alive_nodes())} after {timeout:.0f} s; "
                           f"logs in {self.work}")

    def stop(self) -> None:
        for node in [*self.workers, *([self.head] if self.head else [])]:
            node.stop()
        self.workers, self.head = [], None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
