"""Node status files and heartbeat leases (trinity/run/status.py): when a lease means the node died."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from trinity.run.layout import NodeDir, atomic_write_json
from trinity.run.status import lease_is_stale


def test_stale_lease_means_died(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "n")
    assert lease_is_stale(node)  # no lease at all
    atomic_write_json(
        node.lease, {"pid": os.getpid(), "host": os.uname().nodename, "time": time.time(), "period_s": 30}
    )
    assert not lease_is_stale(node)
    atomic_write_json(
        node.lease, {"pid": os.getpid(), "host": os.uname().nodename, "time": time.time() - 100, "period_s": 30}
    )
    assert lease_is_stale(node)  # no heartbeat for 3 periods
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    atomic_write_json(node.lease, {"pid": dead.pid, "host": os.uname().nodename, "time": time.time(), "period_s": 30})
    assert lease_is_stale(node)  # fresh heartbeat, but the process is gone
