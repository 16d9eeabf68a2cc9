"""Worker processes: finding the interpreter, spawning, watching, stopping.

A :class:`WorkerProcess` is one incarnation of a worker. It knows nothing
about sockets or requests; the client's I/O thread owns those and decides
when to restart (with :class:`Backoff`). Liveness has two sources:

* the process sentinel: a pidfd (Linux) that becomes readable the moment the
  process exits, polled by the I/O thread beside its sockets, so a crash is
  seen within one poll (no time-out involved); elsewhere a waiter thread;
* heartbeats, handled by the I/O thread, for a worker that is alive but hung.

The worker runs in its own session (``start_new_session``): Ctrl-C in the
application's terminal reaches the application only, which then stops the
worker in order instead of both racing to die. The worker watches its parent
and exits by itself if the parent disappears (see ``bridge.worker``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bridge._config import default_worker_python
from bridge._errors import ConfigurationError, WorkerStartupError

__all__ = ["Backoff", "WorkerLaunch", "WorkerProcess", "find_worker_python"]

log = logging.getLogger("bridge.worker")

# Variables that would leak main_env into the worker's interpreter.
_ISOLATION_UNSET = (
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "PYTHONSTARTUP",
    "__PYVENV_LAUNCHER__",
)


def find_worker_python(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the worker interpreter: argument > $BRIDGE_WORKER_PYTHON > infinity_env."""
    path = Path(explicit) if explicit is not None else default_worker_python()
    if not path.exists():
        raise ConfigurationError(
            f"worker interpreter {path} does not exist. Build the worker venv with "
            "`make infinity-env`, or pass worker_python=... / set BRIDGE_WORKER_PYTHON "
            "to the python of a venv that has infinity-emb and this package."
        )
    if not os.access(path, os.X_OK):
        raise ConfigurationError(f"worker interpreter {path} is not executable")
    return path


@dataclasses.dataclass(frozen=True)
class WorkerLaunch:
    """Everything needed to start one worker process (it is started again alike)."""

    python: Path
    endpoint: str
    models: list[dict[str, object]]
    owner_token: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    extra_args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "bridge.worker",
            "--bind",
            self.endpoint,
            "--parent-pid",
            str(os.getpid()),
            "--models-json",
            json.dumps(self.models),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_UNSET}
        env["PYTHONNOUSERSITE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        # Passed by environment, not argv: other users cannot read it from `ps`.
        env["BRIDGE_OWNER_TOKEN"] = self.owner_token
        env.update(self.env)
        return env


class WorkerProcess:
    """One running worker process."""

    def __init__(self, launch: WorkerLaunch, on_exit: Callable[[], None]) -> None:
        self.launch = launch
        self.started_at = time.monotonic()
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        try:
            self._proc = subprocess.Popen(
                launch.argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=launch.environment(),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise WorkerStartupError(f"cannot start the worker {launch.python}: {exc}") from None
        self.pid = self._proc.pid
        self._reader = threading.Thread(
            target=self._read_output, name=f"bridge-worker-{self.pid}-output", daemon=True
        )
        self._reader.start()
        # The sentinel: a pidfd the I/O thread can poll beside its sockets.
        self.sentinel: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.sentinel = os.pidfd_open(self.pid)
            except OSError:
                self.sentinel = None
        if self.sentinel is None:
            threading.Thread(
                target=self._wait_then_notify,
                args=(on_exit,),
                name=f"bridge-worker-{self.pid}-wait",
                daemon=True,
            ).start()

    def _wait_then_notify(self, on_exit: Callable[[], None]) -> None:
        self._proc.wait()
        on_exit()

    def _read_output(self) -> None:
        stream = self._proc.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._output.append(line)
            log.debug("[worker %d] %s", self.pid, line)
        stream.close()

    def output_tail(self, lines: int = 40) -> str:
        self._reader.join(timeout=1.0)  # let the last lines of a dead worker arrive
        return "\n".join(list(self._output)[-lines:])

    def poll(self) -> int | None:
        return self._proc.poll()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def describe_exit(self) -> str:
        code = self._proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def kill(self) -> None:
        """SIGKILL, for a hung worker; the sentinel then reports the exit."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def stop(self, grace: float) -> None:
        """Wait up to ``grace`` s for a clean exit (after BYE), then SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + grace
        if self._wait_until(deadline):
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        if self._wait_until(time.monotonic() + 2.0):
            return
        self.kill()
        self._proc.wait()

    def _wait_until(self, deadline: float) -> bool:
        try:
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        """Release the sentinel (after the process has been reaped)."""
        if self.sentinel is not None:
            with contextlib.suppress(OSError):
                os.close(self.sentinel)
            self.sentinel = None
        self._reader.join(timeout=1.0)


class Backoff:
    """Exponential restart delay: initial, x2 per restart, capped (for the client's lifetime)."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2.0, self._maximum)
        return delay
