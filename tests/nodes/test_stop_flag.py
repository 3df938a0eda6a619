"""The stop request survives a signal arriving while another signal's handler is setting it.

On Slurm a rank receives the job's USR2 and its submitit wrapper's SIGTERM at the same moment.
With a threading.Event the second handler could interrupt the first inside Event.set(), which
holds a non-reentrant lock, and hang the rank (and its peers in the next collective). The script
below delivers the second signal exactly there; the Event variant shows the harness catches it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import os, signal, sys, threading
from trinity.nodes.context import StopFlag
flag = threading.Event() if sys.argv[1] == "event" else StopFlag()
signal.signal(signal.SIGUSR1, lambda signum, frame: flag.set())
fired = []
def tracer(frame, event, arg):
    if event == "call":
        return tracer if frame.f_code.co_name == "set" else None
    if event == "line" and not fired:
        inside = flag._cond._lock.locked() if sys.argv[1] == "event" else frame.f_code.co_name == "set"
        if inside:
            fired.append(frame.f_lineno)
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs now, inside set()
    return tracer
sys.settrace(tracer)
flag.set()
sys.settrace(None)
assert fired and flag.is_set()
print("stopped cleanly")
"""


def run(kind: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=timeout)


def test_stop_flag_can_be_set_from_a_handler_that_interrupts_set() -> None:
    done = run("flag", timeout=60)
    assert done.returncode == 0 and "stopped cleanly" in done.stdout, done.stderr


def test_threading_event_would_hang_there() -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run("event", timeout=3)
