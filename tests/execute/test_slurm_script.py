"""The sbatch script a training node is submitted with, pinned as a golden file.

`submit_all` queues the micro graph's tokenizer, prepare/phase1 and a 2-rank pretrain/phase1 through
submitit's SlurmExecutor exactly as `trinity run --executor slurm` does; only `sbatch`, `sinfo` (a
fixed partition, so the script does not depend on the machine) and `srun` (which submitit looks for)
are stand-ins on PATH, so no cluster is needed. The script submitit wrote
and trinity kept in the node folder (`nodes/pretrain/phase1/slurm/<job>_submission.sh`) must equal
tests/execute/golden/pretrain-2-ranks.sbatch, with the run directory and the Python interpreter
replaced by <RUN> and <PYTHON>.

To re-record after an intended change: delete the golden file and run this test with
TRINITY_RECORD_GOLDEN=1 (it writes the file and passes; review the diff). Without the variable a
missing golden file fails, so CI never passes without one.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from tests.cli_runs import NODE
from tests.conftest import compose
from tests.execute.conftest import TWO_RANKS
from trinity.execute.run import write_run
from trinity.execute.slurm import submit_all
from trinity.spec.loading import load_experiment

GOLDEN = Path(__file__).parent / "golden" / "pretrain-2-ranks.sbatch"
RECORD = "TRINITY_RECORD_GOLDEN"

SBATCH = """\
#!/bin/sh
# A stand-in for sbatch: answers as sbatch does, with job ids 1, 2, 3, ... in submission order.
n=$(cat "$0.count" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$0.count"
echo "Submitted batch job $n"
"""
SINFO = """\
#!/bin/sh
# A stand-in for `sinfo -h -N -o ...`: one partition 'debug' of one node with 16 CPUs and 64 GB.
echo 'debug*|node1|16|65536|(null)|UNLIMITED|infinite|1-infinite'
"""
SLURM = {
    "executor": "slurm",
    "slurm": {
        "partition": "debug",
        "account": "trinity",
        "time_min": {"default": 60, "pretrain": 240},
        "cpus_per_task": 2,
        "mem_gb": 16,
        "extra_sbatch": {"constraint": "cpu"},
    },
}


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin folder first on PATH: sbatch answers with a job id, sinfo with one partition; srun and scontrol
    do nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"sbatch": SBATCH, "sinfo": SINFO, "srun": "#!/bin/sh\nexit 0\n", "scontrol": "#!/bin/sh\nexit 1\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_the_sbatch_script_of_a_two_rank_training_node_is_the_golden_one(fake_slurm: Path, tmp_path: Path) -> None:
    graph = compose(tmp_path / "micro.yaml", "micro.yaml", parallel=TWO_RANKS, execution=SLURM)
    run, dag = write_run(load_experiment(graph), tmp_path / "run")
    state = submit_all(run, dag, ["tokenizer", "prepare/phase1", NODE])
    # Job 2 is prepare/phase1's shard array (execution.prepare.shards tasks), job 3 the node's own job after it.
    assert {n: str(s.job.job_id) for n, s in state.submissions.items()} == {
        "tokenizer": "1",
        "prepare/phase1": "3",
        NODE: "4",
    }
    prepare_script = (run.node("prepare/phase1").root / "slurm" / "3_submission.sh").read_text()
    assert "afterok:1,afterany:2" in prepare_script
    kept = run.node(NODE).root / "slurm" / "4_submission.sh"
    assert kept.is_file(), "the sbatch script is kept in the node folder"
    text = kept.read_text()
    for path in {str(run.root.resolve()), str(run.root)}:
        text = text.replace(path, "<RUN>")
    text = text.replace(shlex.quote(sys.executable), "<PYTHON>")
    assert "afterok:3" in text  # prepare/phase1's job; the tokenizer is not a direct dependency

    if not GOLDEN.is_file():
        if os.environ.get(RECORD) != "1":
            pytest.fail(f"{GOLDEN} is missing: record it with {RECORD}=1 pytest {__file__}")
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
        return
    assert text == GOLDEN.read_text(), (
        f"the sbatch script differs from {GOLDEN.name}; if the change is intended, delete it and "
        f"re-record with {RECORD}=1"
    )
