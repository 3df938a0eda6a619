"""The store shared across runs (execution.store): a second run reuses what a first one published, two
concurrent runs produce one output, a stale producer's lease is taken over, a damaged entry is never
reused, and a reused node submits no Slurm job.

The references are independent of the code under test: inode numbers (nothing copied), which process
wrote the node's log (the body ran or not), the store's files as the first run wrote them, and a real
dead process for the stale lease.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cli_runs import trinity
from tests.conftest import compose
from trinity.run.layout import NodeDir, RunDir, atomic_write_json
from trinity.run.shared_store import MARKER, LeaseOwner, SharedStore, StoreLease, claim, entry_problem
from trinity.run.status import list_attempts
from trinity.store.catalog import open_catalog

PREPARE = "prepare/phase1"


def _graph(tmp: Path, store: Path) -> Path:
    return compose(tmp / "micro.yaml", "micro.yaml", execution={"store": str(store)})


def _run(graph: Path, run: Path, *nodes: str) -> subprocess.CompletedProcess[str]:
    result = trinity("run", str(graph), "--run-dir", str(run), "--nodes", *nodes)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _entry(store: Path, run: Path, node: str) -> Path:
    identity = str(json.loads(RunDir(run).node(node).status.read_text())["identity"])
    return store / "nodes" / identity


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A run of tokenizer and prepare/phase1 that published both to a fresh store: (graph, run, store)."""
    tmp = tmp_path_factory.mktemp("shared")
    store = tmp / "store"
    graph = _graph(tmp, store)
    _run(graph, tmp / "run1", PREPARE)
    return graph, tmp / "run1", store


@pytest.mark.slow
def test_a_second_run_reuses_tokenizer_and_prepare_by_hard_links(
    first: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    graph, run1, store = first
    for node in ("tokenizer", PREPARE):
        assert entry_problem(_entry(store, run1, node), _entry(store, run1, node).name) is None
    run2 = tmp_path / "run2"
    _run(graph, run2, PREPARE)
    for node in ("tokenizer", PREPARE):
        node_dir = RunDir(run2).node(node)
        (attempt,) = list_attempts(node_dir)
        assert (attempt.executor, attempt.state) == ("store", "SUCCEEDED")
        assert attempt.reused_from == str(_entry(store, run1, node))
        assert not node_dir.logs.exists()  # no process ran the body
        # Nothing copied: each output file of run2 is the very inode run1 wrote.
        produced = sorted(p for p in RunDir(run1).node(node).outputs.rglob("*") if p.is_file())
        assert produced
        for p in produced:
            linked = node_dir.outputs / p.relative_to(RunDir(run1).node(node).outputs)
            assert linked.stat().st_ino == p.stat().st_ino
    explained = trinity("explain", str(run2), PREPARE)
    assert f"reused from {_entry(store, run1, PREPARE)}" in explained.stdout, explained.stdout + explained.stderr
    planned = trinity("plan", str(graph))
    assert f"{PREPARE}: reused from {_entry(store, run1, PREPARE)}" in planned.stdout.replace("\n", "")
    con = open_catalog(run2)
    rows = con.sql("select node, executor, reused_from from attempts order by node").fetchall()
    assert rows == [
        (PREPARE, "store", str(_entry(store, run1, PREPARE))),
        ("tokenizer", "store", str(_entry(store, run1, "tokenizer"))),
    ]
    events = con.sql("select node, kind from events order by node").fetchall()
    assert events == [(PREPARE, "reused"), ("tokenizer", "reused")]
    sql = trinity("sql", str(run2), "select node, reused_from from attempts where executor = 'store'", "-f", "csv")
    assert sql.returncode == 0 and str(_entry(store, run1, PREPARE)) in sql.stdout, sql.stdout + sql.stderr


@pytest.mark.slow
def test_a_run_made_before_the_store_was_set_shares_what_it_holds(
    first: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    graph, run1, _ = first
    store = tmp_path / "store"  # empty: run1's nodes SUCCEEDED before this store existed
    result = trinity("run", str(graph), "--run-dir", str(run1), "--nodes", PREPARE, "--set", f"execution.store={store}")
    assert result.returncode == 0, result.stdout + result.stderr
    for node in ("tokenizer", PREPARE):
        entry = _entry(store, run1, node)
        assert f"{node}: published to {entry}" in result.stdout.replace("\n", "")
        assert entry_problem(entry, entry.name) is None
        produced = sorted(p for p in RunDir(run1).node(node).outputs.rglob("*") if p.is_file())
        for p in produced:  # hard links of run1's own files
            assert (entry / "outputs" / p.relative_to(RunDir(run1).node(node).outputs)).stat().st_ino == p.stat().st_ino
        (attempt,) = list_attempts(RunDir(run1).node(node))  # nothing ran again in run1
        assert attempt.executor == "local"


@pytest.mark.slow
def test_a_damaged_entry_is_not_reused_and_is_set_aside(first: tuple[Path, Path, Path], tmp_path: Path) -> None:
    graph, run1, _ = first
    store = tmp_path / "store"  # a copy of the first run's store, to damage
    subprocess.run(["cp", "-a", str(first[2]), str(store)], check=True)
    graph = compose(tmp_path / "micro.yaml", "micro.yaml", execution={"store": str(store)})
    entry = _entry(store, run1, "tokenizer")
    (entry / "outputs" / "tokenizer.json").unlink()
    run2 = tmp_path / "run2"
    result = _run(graph, run2, "tokenizer")
    assert "reused from" not in result.stdout
    (attempt,) = list_attempts(RunDir(run2).node("tokenizer"))
    assert attempt.executor == "local" and attempt.reused_from is None  # it ran
    explained = trinity("explain", str(run2), "tokenizer")
    assert "reused" in explained.stdout  # SUCCEEDED in run2 now; and the store was republished whole:
    assert entry_problem(entry, entry.name) is None
    assert len(list(store.glob(f"nodes/{entry.name}.damaged-*"))) == 1  # the damaged one set aside, kept


@pytest.mark.slow
def test_two_concurrent_runs_produce_one_output(tmp_path: Path) -> None:
    store = tmp_path / "store"
    graph = _graph(tmp_path, store)
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trinity.cli", "run", str(graph), "--run-dir", str(r), "--nodes", "tokenizer"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in runs
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    attempts = [a for r in runs for a in list_attempts(RunDir(r).node("tokenizer"))]
    assert all(a.state == "SUCCEEDED" for a in attempts), attempts
    ran = [a for a in attempts if a.reused_from is None]
    reused = [a for a in attempts if a.reused_from is not None]
    assert len(ran) == 1 and len(reused) == 1, attempts  # one body ran; the other took its entry
    entries = [p for p in (store / "nodes").iterdir()]
    assert [p.name for p in entries] == [ran[0].identity]  # one entry, no lease or temporary left
    assert entry_problem(entries[0], ran[0].identity) is None
    for r in runs:  # both runs' tokenizer.json are the one file
        assert (RunDir(r).node("tokenizer").outputs / "tokenizer.json").stat().st_ino == (
            entries[0] / "outputs" / "tokenizer.json"
        ).stat().st_ino


# -- the lease and the entry contract, without runs ------------------------------------------------

IDENTITY = "ab" * 32


def _node_with_outputs(root: Path) -> NodeDir:
    node = NodeDir(root / "nodes" / "tokenizer")
    atomic_write_json(node.outputs / "tokenizer.json", {"vocab": list(range(100))})
    return node


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_stale_lease_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    store = SharedStore(tmp_path / "store")
    dead = LeaseOwner(socket.gethostname(), _dead_pid(), None, "/elsewhere/run", "tokenizer", 60.0)
    held = StoreLease.try_create(store.lease_file(IDENTITY), dead)
    assert held is not None
    held._stop.set()  # the dead owner refreshes nothing
    me = LeaseOwner.me(tmp_path / "run", "tokenizer", 60.0)
    heard: list[str] = []
    got = claim(store, IDENTITY, me, on_wait=heard.append, poll_s=0.01)
    assert got.lease is not None and got.lease.held() and got.entry is None
    assert any("is gone" in h for h in heard), heard
    got.lease.release()
    assert not store.lease_file(IDENTITY).exists()


def test_a_live_owner_is_waited_for_and_its_entry_reused(tmp_path: Path) -> None:
    store = SharedStore(tmp_path / "store")
    producer = LeaseOwner.me(tmp_path / "run-a", "tokenizer", 0.2)
    lease = StoreLease.try_create(store.lease_file(IDENTITY), producer)
    assert lease is not None
    node = _node_with_outputs(tmp_path / "run-a")

    def produce() -> None:
        time.sleep(1.0)  # five heartbeats: the waiter must not judge it stale meanwhile
        store.publish(node, identity=IDENTITY, kind="tokenizer", node_id="tokenizer", run_root=tmp_path, run_id="a")
        lease.release()

    thread = threading.Thread(target=produce)
    thread.start()
    me = LeaseOwner.me(tmp_path / "run-b", "tokenizer", 0.2)
    heard: list[str] = []
    got = claim(store, IDENTITY, me, on_wait=heard.append, poll_s=0.05)
    thread.join()
    assert got.entry == store.entry(IDENTITY) and got.lease is None
    assert any("waiting for tokenizer of run" in h for h in heard), heard


def test_a_wait_ends_when_stop_is_requested(tmp_path: Path) -> None:
    store = SharedStore(tmp_path / "store")
    lease = StoreLease.try_create(store.lease_file(IDENTITY), LeaseOwner.me(tmp_path / "a", "tokenizer", 5.0))
    assert lease is not None
    stops = iter([False, False, True])
    got = claim(store, IDENTITY, LeaseOwner.me(tmp_path / "b", "tokenizer", 5.0), stop=lambda: next(stops), poll_s=0.01)
    assert got.stopped and got.entry is None and got.lease is None
    lease.release()


@pytest.mark.parametrize("damage", ["marker", "identity", "file", "size"])
def test_a_damaged_entry_is_treated_as_absent(tmp_path: Path, damage: str) -> None:
    store = SharedStore(tmp_path / "store")
    node = _node_with_outputs(tmp_path / "run")
    placed = store.publish(
        node, identity=IDENTITY, kind="tokenizer", node_id="tokenizer", run_root=tmp_path, run_id="r"
    )
    assert placed.copied is None and store.find(IDENTITY).usable
    assert (placed.path / "outputs" / "tokenizer.json").stat().st_ino == (node.outputs / "tokenizer.json").stat().st_ino
    entry = store.entry(IDENTITY)
    if damage == "marker":
        (entry / MARKER).unlink()
    elif damage == "identity":
        meta = json.loads((entry / "entry.json").read_text())
        atomic_write_json(entry / "entry.json", {**meta, "identity": "cd" * 32})
    elif damage == "file":
        (entry / "outputs" / "tokenizer.json").unlink()
    else:
        with open(entry / "outputs" / "tokenizer.json", "a") as f:
            f.write(" ")
    found = store.find(IDENTITY)
    assert found.path == entry and not found.usable and found.problem
    got = claim(store, IDENTITY, LeaseOwner.me(tmp_path / "b", "tokenizer", 5.0), poll_s=0.01)
    assert got.lease is not None and got.entry is None  # not reused: the caller runs the node
    got.lease.release()


def test_a_name_that_is_not_an_identity_never_becomes_a_path(tmp_path: Path) -> None:
    from trinity.errors import RunError

    store = SharedStore(tmp_path / "store")
    for bad in ("../../etc", "ABC", "", "ab/cd" * 8):
        with pytest.raises(RunError, match="not a node identity"):
            store.entry(bad)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_node_reused_from_the_store_submits_no_slurm_job(first: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from tests.execute.conftest import require_slurm_cluster

    require_slurm_cluster()
    graph = first[0]
    run2 = tmp_path / "run2"
    result = trinity("run", str(graph), "--run-dir", str(run2), "--nodes", PREPARE, "--executor", "slurm")
    assert result.returncode == 0, result.stdout + result.stderr
    for node in ("tokenizer", PREPARE):
        node_dir = RunDir(run2).node(node)
        assert [(a.executor, a.job_id) for a in list_attempts(node_dir)] == [("store", None)]
        assert not (node_dir.root / "slurm").exists()
    jobs = run2 / "slurm_jobs.json"
    assert not jobs.exists() or json.loads(jobs.read_text()) == {}
