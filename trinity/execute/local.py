"""The local executor: each node attempt in its own subprocess (a crash kills the node, not the run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from trinity.execute.executor import Finished
from trinity.execute.rundir import RunDir

STOP_GRACE_S = 120.0


@dataclass
class LocalHandle:
    node_id: str
    attempt: int
    process: subprocess.Popen[bytes]
    stop_sent: float | None = field(default=None)

    def poll(self) -> Finished | None:
        code = self.process.poll()
        if code is None:
            if self.stop_sent is not None and time.monotonic() - self.stop_sent > STOP_GRACE_S:
                os.killpg(self.process.pid, signal.SIGKILL)
            return None
        if code < 0:
            return Finished(None, -code, f"killed by signal {signal.Signals(-code).name}")
        return Finished(code, None, "" if code == 0 else f"exited with status {code}")

    def stop(self) -> None:
        """SIGTERM: the node commits a checkpoint at the next step and exits; SIGKILL after a grace period."""
        if self.process.poll() is None and self.stop_sent is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.stop_sent = time.monotonic()


@dataclass
class LocalExecutor:
    run: RunDir
    name: str = "local"
    env: dict[str, str] = field(default_factory=dict)

    def launch(self, node_id: str, attempt: int) -> LocalHandle:
        node_dir = self.run.node(node_id)
        log_path = node_dir.log_file(attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "trinity.nodes.entry",
            str(self.run.root),
            node_id,
            "--attempt",
            str(attempt),
            "--executor",
            self.name,
        ]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the scheduler, which stops nodes cleanly
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        return LocalHandle(node_id, attempt, process)
