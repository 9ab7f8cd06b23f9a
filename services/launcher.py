"""Launching and watching ``python -m pipeline run SPEC`` as Ray jobs (``JobSubmissionClient``).

:class:`EmbeddedHead` starts a local Ray head (``ray start --head --block`` in a subprocess, with its own
token-auth token) when no cluster address is configured, and stops exactly that head on shutdown.
:class:`RayLauncher` wraps the job submission client: submit with ``submission_id`` = the job id, status,
stop, log tail, and the job list from which jobs started with ``ray job submit`` are discovered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HEAD_START_TIMEOUT_S = 120.0  # a cold `ray start` on 2 busy cores takes 5–30 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which a killed parent leaves until it is reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return not Path("/proc").is_dir()  # without /proc: alive; with it, the stat read failed: gone


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM ``pid`` (not a child of ours), wait for it to go, SIGKILL it after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class EmbeddedHead:
    """A local Ray head owned by this service, with token authentication.

    The head's pid and address are recorded in ``<state_dir>/ray-head.json``. A service that was killed
    (``kill -9``) leaves its head running; the next start re-attaches to that head — so jobs that ran or
    finished meanwhile are still known to Ray — instead of starting a second one, and a recorded head that
    no longer answers is stopped first.

    Args:
        state_dir: Where the token file, the record and the head's output log go.
        num_cpus: CPUs Ray may schedule (default: all).
        cwd: Working directory of the head, and so of job drivers (relative spec paths resolve here).
    """

    def __init__(self, state_dir: Path, *, num_cpus: int | None = None, cwd: Path | None = None) -> None:
        self.state_dir, self.num_cpus, self.cwd = state_dir, num_cpus, cwd or Path.cwd()
        self.token_path = state_dir / "ray_token"
        self.record_path = state_dir / "ray-head.json"
        # A temp dir of its own: Ray resolves a job driver's cluster through <temp_dir>/ray_current_cluster,
        # which under the shared /tmp/ray names whichever cluster on this machine started last. (Short, for
        # Ray's Unix socket paths.)
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
        self.temp_dir = Path(tempfile.gettempdir()) / f"distillery-ray-{digest}"
        self.address: str | None = None
        self.pid: int | None = None
        self.adopted = False  # re-attached to a head a previous service process started
        self._proc: subprocess.Popen | None = None

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def _answers(self, address: str, timeout: float = 5) -> bool:
        with contextlib.suppress(httpx.HTTPError, OSError):
            headers = {"Authorization": f"Bearer {self.token}"}
            return httpx.get(f"{address}/api/version", headers=headers, timeout=timeout).status_code == 200
        return False

    def _adopt(self) -> str | None:
        """Re-attach to the head recorded by a previous process, if it still runs; stop it if it is broken."""
        try:
            record = json.loads(self.record_path.read_text())
            pid, address = int(record["pid"]), str(record["address"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if _pid_alive(pid) and "ray" in _cmdline(pid) and "--head" in _cmdline(pid):
            if self._answers(address):
                self.pid, self.address, self.adopted = pid, address, True
                return address
            _terminate(pid, timeout=60)  # ours, but not answering: replace it
        self.record_path.unlink(missing_ok=True)
        return None

    def start(self) -> str:
        """Start the head (or re-attach to ours) and wait for its job server; return the dashboard URL."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        if (address := self._adopt()) is not None:
            return address
        dashboard = free_port()
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray if os.path.exists(ray) else "ray", "start", "--head", "--block", "--disable-usage-stats",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.temp_dir}"]
        if self.num_cpus:
            cmd.append(f"--num-cpus={self.num_cpus}")
        # This head runs no Serve replicas to migrate: stop at once instead of draining for up to 30 s.
        env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"} | dict(os.environ)
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        env.pop("RAY_AUTH_TOKEN", None)  # the file wins only when no token is set in the environment
        env.pop("RAY_ADDRESS", None)
        log_fd = os.open(self.state_dir / "ray-head.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=log_fd, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        os.close(log_fd)
        self.pid, self.address = self._proc.pid, f"http://127.0.0.1:{dashboard}"
        fd = os.open(self.record_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": self.pid, "address": self.address}, f)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.record_path.unlink(missing_ok=True)
                raise RuntimeError(f"ray start exited with {self._proc.returncode}; see {self.state_dir}/ray-head.log")
            if self._answers(self.address, timeout=2):
                return self.address
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Ray head not up after {HEAD_START_TIMEOUT_S:.0f} s; see {self.state_dir}/ray-head.log")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the ``ray start --block`` process, which stops every process of this head."""
        proc, pid, self._proc, self.pid = self._proc, self.pid, None, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc is None and pid is not None:
            _terminate(pid, timeout)
        self.record_path.unlink(missing_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # the head's sessions and sockets; its log stays


@dataclass
class RayJob:
    """What Ray knows of one submitted job."""

    submission_id: str
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    entrypoint: str
    message: str | None
    start_time: float | None  # seconds since the epoch
    end_time: float | None


def pipeline_spec_path(entrypoint: str) -> str | None:
    """The spec file named by an entrypoint ``[…] python -m pipeline run SPEC [--address A]``, else None."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        return None
    for i in range(len(words) - 2):
        if words[i:i + 3] == ["-m", "pipeline", "run"]:
            rest = words[i + 3:]
            while rest:
                word = rest.pop(0)
                if word == "--address":
                    rest = rest[1:]
                elif not word.startswith("-"):
                    return word
                elif word in ("&&", ";", "|"):
                    return None
    return None


class RayLauncher:
    """Submits, watches and stops pipeline jobs on one Ray cluster.

    Args:
        address: Ray dashboard URL (``http://127.0.0.1:8265``).
        token: Bearer token for a cluster with token authentication (None: Ray's own lookup).
        python: Interpreter of the entrypoint on the cluster.
        env: Environment variables of every job (its driver and its workers), e.g. ``DISTILLERY_UMASK``.
    """

    def __init__(self, address: str, *, token: str | None = None, python: str = "python",
                 env: dict[str, str] | None = None) -> None:
        self.address, self.python, self.env = address, python, dict(env or {})
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address, headers=dict(self._headers))
        return self._client

    def entrypoint(self, spec_path: Path) -> str:
        return f"{shlex.quote(self.python)} -m pipeline run {shlex.quote(str(spec_path))}"

    def submit(self, *, job_id: str, spec_path: Path) -> str:
        """Start ``python -m pipeline run SPEC`` with ``submission_id = job_id``."""
        runtime_env = {"env_vars": self.env} if self.env else None
        return self.client.submit_job(entrypoint=self.entrypoint(spec_path), submission_id=job_id,
                                      runtime_env=runtime_env)

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL); False if it had already finished."""
        return self.client.stop_job(submission_id)

    def logs_tail(self, submission_id: str, lines: int) -> str:
        with contextlib.suppress(Exception):
            return "\n".join(self.client.get_job_logs(submission_id).splitlines()[-lines:])
        return ""

    def jobs(self) -> dict[str, RayJob]:
        """Every submitted job Ray knows, by submission id (drivers started without submission are left out)."""
        out = {}
        for info in self.client.list_jobs():
            if info.submission_id is None:
                continue
            out[info.submission_id] = RayJob(
                submission_id=info.submission_id, status=str(info.status.value), entrypoint=info.entrypoint or "",
                message=info.message, start_time=info.start_time / 1000 if info.start_time else None,
                end_time=info.end_time / 1000 if info.end_time else None)
        return out

    def max_node_cpus(self) -> float | None:
        """CPUs of the cluster's largest alive node (what one actor can reserve at most); None if unknown.

        Read from the dashboard's state API, so the service never joins the cluster as a driver.
        """
        try:
            response = httpx.get(f"{self.address}/api/v0/nodes", params={"limit": 10000, "detail": "true"},
                                 headers=self._headers, timeout=10)
            response.raise_for_status()
            nodes = response.json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        cpus = [float((n.get("resources_total") or {}).get("CPU", 0)) for n in nodes if n.get("state") == "ALIVE"]
        return max(cpus) if cpus else None

    def reachable(self) -> bool:
        try:
            self.client.get_version()
            return True
        except Exception:
            self._client = None  # reconnect (and re-check the version) next time
            return False
