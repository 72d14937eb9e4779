"""Several real hub processes on one database, for load tests and benchmarks.

Each process is `python -m server serve` on its own port on 127.0.0.1, with the
same data directory (hub keys, master key) and the same
`FIELDREG_HUB_DATABASE_URL`, as a deployment behind a reverse proxy would run
them. `PYTHONPATH` is inherited, so the processes run the code under test.
Output goes to one log file per process, shown when a process fails to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.settings import HubSettings
from tests.hubkit import free_port

__all__ = ["HubProcesses", "hub_processes"]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@dataclass
class HubProcesses:
    """The running processes and their base URLs, in the same order."""

    procs: list[subprocess.Popen[bytes]]
    urls: list[str]
    logs: list[Path]

    def cpu_s(self) -> float:
        """CPU seconds all the processes have used so far (0.0 where /proc is missing)."""
        total = 0.0
        for proc in self.procs:
            try:
                stat = Path(f"/proc/{proc.pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def logs_text(self) -> str:
        """Everything the processes wrote."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_tail(self, chars: int = 2000) -> str:
        """The end of every process's log, for a failure message."""
        parts = []
        for path in self.logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(parts)


def _env(settings: HubSettings) -> dict[str, str]:
    env = {**os.environ, "FIELDREG_HUB_DATA_DIR": str(settings.data_dir)}
    env.pop("FIELDREG_HUB_DATABASE_URL", None)  # SQLite unless the settings name a database
    if settings.database_url:
        env["FIELDREG_HUB_DATABASE_URL"] = settings.database_url
    return env


def _command(settings: HubSettings) -> list[str]:
    serve = [sys.executable, "-m", "server", "serve", "--data-dir", str(settings.data_dir)]
    return [*serve, "--host", "127.0.0.1"]


def _wait_ready(group: HubProcesses, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = set(range(len(group.procs)))
    while waiting:
        for i in sorted(waiting):
            proc = group.procs[i]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"hub process {i} exited with {proc.returncode}\n{group.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{group.urls[i]}/healthz", timeout=2).status_code == 200:
                    waiting.discard(i)
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"hub processes {sorted(waiting)} did not start\n{group.log_tail()}")
        if waiting:
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the process (uvicorn shuts down gracefully), SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def hub_processes(
    settings: HubSettings,
    count: int,
    *,
    log_dir: Path,
    start_timeout_s: float = START_TIMEOUT_S,
    stop_timeout_s: float = STOP_TIMEOUT_S,
) -> Iterator[HubProcesses]:
    """Start `count` hub processes over `settings` (an initialised hub), wait until
    every one answers `/healthz`, yield them, and stop them all afterwards."""
    if count < 1:
        raise ValueError("count must be at least 1")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _env(settings)
    group = HubProcesses([], [], [])
    try:
        for i in range(count):
            port = free_port()
            log = log_dir / f"hub-{i}-{port}.log"
            with log.open("wb") as out:
                group.procs.append(
                    subprocess.Popen(
                        [*_command(settings), "--port", str(port)],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            group.urls.append(f"http://127.0.0.1:{port}")
            group.logs.append(log)
        _wait_ready(group, start_timeout_s)
        yield group
    finally:
        for proc in group.procs:
            _stop(proc, stop_timeout_s)
