"""What the chaos benchmark (``bench/chaos.py``) faults: the run's broker and Redis, and its ``fusionrec``
processes, each in a session of its own so that a SIGKILL takes its children (a pool's workers) too."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fusionrec.apps.services import redis_url, start_broker, start_redis
from fusionrec.core.errors import ServiceError

FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _reap(pid: int, timeout: float = 10.0) -> bool:
    """Wait for a child to be gone (reaped here, or by subprocess' own clean-up); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


def _end(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _reap(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)


class Services:
    """The run's broker and Redis: Redis is killed and started again on its port, the broker paused."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.broker = start_broker(run_dir)
        self.redis = start_redis(run_dir, "aof")
        self.paused = False

    @property
    def redis_url(self) -> str:
        return redis_url(self.redis)

    def kill_redis(self) -> None:
        os.kill(self.redis.pid, signal.SIGKILL)
        _reap(self.redis.pid)

    def restart_redis(self, tries: int = 5) -> None:
        """On the same port, with the same password and AOF directory."""
        for attempt in range(tries):
            try:
                self.redis = start_redis(self.run_dir, "aof", port=self.redis.port)
                return
            except ServiceError:
                if attempt == tries - 1:
                    raise
                time.sleep(1.0)

    def pause_broker(self, paused: bool) -> None:
        os.kill(self.broker.pid, signal.SIGSTOP if paused else signal.SIGCONT)
        self.paused = paused

    def down(self) -> None:
        if self.paused:
            self.pause_broker(False)
        for info in (self.broker, self.redis):
            _end(info.pid)


class Proc:
    """One ``fusionrec`` process of the run, in a session of its own: a kill takes its children too."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env = name, args, env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.down = False  # killed on purpose, restart pending: not an unplanned exit

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "fusionrec", *self.args], env=self.env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.down = False

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self) -> None:
        self.down = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        assert self.popen is not None
        self.popen.wait()

    def exited(self) -> int | None:
        """The exit code of an exit nobody asked for, else None."""
        return None if self.down or self.popen is None else self.popen.poll()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (drain and commit), then SIGKILL to the group; the exit code of the SIGTERM."""
        if self.popen is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()
        return code

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def spawned_children(pid: int) -> list[int]:
    """Live multiprocessing ``spawn`` children of ``pid`` (the pool's workers, not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(entry.name))
    return found


def crash_summary(log: str) -> dict[str, str]:
    """The last exception line of a log, and the frames of fusionrec's own code in its last traceback."""
    lines = log.splitlines()
    error = next((ln for ln in reversed(lines) if ln and not ln.startswith(" ")), "")
    last = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), default=0)
    frames = [m for ln in lines[last:] if (m := FRAME.search(ln)) and "site-packages" not in m[1] and "<" not in m[1]]
    return {"error": error, "where": " > ".join(f"{Path(m[1]).name}:{m[2]} {m[3]}" for m in frames[-5:])}
