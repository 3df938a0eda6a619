"""Every command of README.md and docs/*.md, run as written against real runs, so the docs cannot drift.

Each ```bash block is split into commands (a command ends where its quotes close; a `#` comment after it is
bash's). They run in document order (README.md, docs/guide.md, docs/telemetry.md, docs/results.md) with
bash, in a workspace laid out like the repository (graphs/, specs/, tests/graphs/, pyproject.toml), where
`trinity`, `python3` and `python` are this checkout's; the graph files the docs write out (a ```yaml block
whose first line is `# graphs/NAME.yaml`) are saved there first. Each must exit 0, and a quoted "text" in
its trailing comment must appear in what it printed.

The README's main command trains the tiny graph; here graphs/tiny.yaml is the repository's with its
budgets cut (every phase at sequence length 64, 4 sequences a step: 100 steps in all, so the guide's
`--step 100` export finds its checkpoint) so the whole walk takes minutes; every node id, stage and
command stays what the docs say. A command that cannot run here as written is listed below with the test
that covers it (ELSEWHERE) or the command run in its place (INSTEAD), each with its reason; an entry the
docs no longer hold is an error, as is a command in neither list that fails.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

DOCS = ["README.md", "docs/guide.md", "docs/telemetry.md", "docs/results.md"]

ELSEWHERE: dict[str, tuple[str, str, str]] = {
    # command: (file, text the file must hold, why it is not run here)
    "bash scripts/setup.sh && bash scripts/test.sh": (
        ".ci/run",
        "bash scripts/setup.sh && bash scripts/test.sh",
        "CI runs exactly this; these tests are part of it",
    ),
    "bash scripts/slurm-local.sh up && export SLURM_CONF=/tmp/trinity-slurm/etc/slurm.conf": (
        "scripts/test.sh",
        "slurm-local.sh",
        "the test script brings the local cluster up before the tests",
    ),
    "trinity run graphs/tiny.yaml --executor slurm": (
        "tests/execute/test_slurm_readme.py",
        "def test_the_readme_slurm_command_runs_the_tiny_graph_on_the_local_cluster(",
        "typed as written there, on the local Slurm cluster",
    ),
    "trinity plan graphs/trinity-large.yaml --trace": (
        "tests/distributed/test_trace.py",
        "def test_preset_traces_agree_with_the_analytic_estimate(",
        "about 1.5 min of CPU per traced stage; that test traces the presets at full world size",
    ),
    "trinity plan graphs/trinity-large.yaml --trace --json": (
        "tests/distributed/test_trace.py",
        "def test_plan_trace_cli_exits_2_over_memory(",
        "the --trace --json output is read there (on the tiny graph, in seconds)",
    ),
    "trinity run graphs/tiny-distributed.yaml": (
        "tests/execute/test_local.py",
        "def test_local_executor_runs_a_two_rank_node_through_torchrun(",
        "4 ranks of the tiny recipe take many minutes on 2 cores; the torchrun launch is tested on 2 ranks",
    ),
    "trinity run graphs/tiny-distributed.yaml --executor slurm": (
        "tests/execute/test_slurm.py",
        "def test_slurm_preemption_signal_stops_every_task_and_the_requeued_job_resumes_exactly(",
        "a job of several tasks is tested on 2 ranks of the micro graph (4 ranks: many minutes on 2 cores)",
    ),
}

INSTEAD: dict[str, tuple[str, str]] = {
    # command: (the command run in its place, why)
    "bash scripts/setup.sh && trinity run graphs/tiny.yaml": (
        "trinity run graphs/tiny.yaml",
        "the setup ran before the tests (.ci/run); the main job itself runs here",
    ),
    "trinity plan graphs/my-run.yaml --trace": (
        "trinity plan graphs/my-run.yaml",
        "a trace of a Nano-size stage takes minutes of CPU (traces: tests/distributed/test_trace.py)",
    ),
    "trinity run graphs/my-run.yaml": (
        "trinity run graphs/my-run.yaml --dry-run",
        "it submits Nano's 64-node jobs to a partition `gpu`; the dry run builds every job's sbatch parameters",
    ),
    "trinity run graphs/ablations/rsdb-vs-sequential.yaml --run-dir runs/ablation-rsdb --jobs 2": (
        "trinity plan graphs/ablations/rsdb-vs-sequential.yaml",
        "6 runs of 600 steps: hours on 2 cores (docs/results.md holds what they measured)",
    ),
    "trinity run graphs/ablations/smebu-vs-sign.yaml --run-dir runs/ablation-smebu --jobs 2": (
        "trinity plan graphs/ablations/smebu-vs-sign.yaml",
        "9 runs of 600 steps: hours on 2 cores (docs/results.md holds what they measured)",
    ),
}
"""The ablations' queries run as written against runs/tiny (ABLATION_RUNS): they parse and bind against the
same tables, and answer with no rows where a sweep's branches are expected."""

ABLATION_RUNS = {"runs/ablation-rsdb": "runs/tiny", "runs/ablation-smebu": "runs/tiny"}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str
    """The command as bash reads it, without its trailing comment."""
    comment: str

    @property
    def key(self) -> str:
        return " ".join(self.text.split())

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _balanced(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return not text.rstrip().endswith("\\")


def _split_comment(before: str, line: str) -> tuple[str, str]:
    """`line` (the last line of a command that starts with `before`) cut at its trailing comment, if any."""
    for match in re.finditer(r"\s#", line):
        head = line[: match.start()]
        if _balanced(before + head) and shlex.split(before + head, comments=True):
            return head.rstrip(), line[match.start() :].strip()
    return line.rstrip(), ""


def doc_commands() -> list[Command]:
    """Every command of every ```bash block of DOCS, in document order."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
            first_line = text[: block.start(1)].count("\n") + 1
            buf, start = "", 0
            for i, line in enumerate(block.group(1).splitlines()):
                if not buf and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                if not buf:
                    start = first_line + i
                if _balanced(buf + line):
                    command, comment = _split_comment(buf, line)
                    found.append(Command(doc, start, buf + command, comment))
                    buf = ""
                else:
                    buf += line + "\n"
            assert not buf, f"{doc}:{start}: a command whose quotes never close"
    return found


def test_the_docs_commands_are_found() -> None:
    commands = doc_commands()
    keys = [c.key for c in commands]
    assert "trinity run graphs/tiny.yaml --executor slurm" in keys
    multi = next(c for c in commands if c.text.startswith('trinity sql runs/my-micro-evals "select'))
    assert multi.text.count("\n") == 2 and multi.comment == ""
    store = next(c for c in commands if c.key.startswith("trinity run graphs/my-tiny-lr.yaml"))
    assert store.comment.startswith('# "0 node(s) to run, 5 reused"')
    assert len(commands) >= 40


# -- the workspace ---------------------------------------------------------------------------------------


def _shrink_tiny(work: Path) -> None:
    """graphs/tiny.yaml and specs/data/tiny.yaml of the workspace with the budgets cut (module docstring)."""
    graph_path, data_path = work / "graphs" / "tiny.yaml", work / "specs" / "data" / "tiny.yaml"
    graph, data = yaml.safe_load(graph_path.read_text()), yaml.safe_load(data_path.read_text())
    for phase, tokens in zip(data["phases"], [12800, 6400, 6400], strict=True):
        phase.update(tokens=tokens, seq_len=64)
    graph["tokenizer"]["sample_bytes"] = 300000
    graph["optim"]["batch"] = [{"start_tokens": 0, "sequences": 4}]
    stages = graph["stages"]
    stages["extend"]["tokens"] = 8192
    stages["sft"].update(tokens=8192, math_conversations=100)
    stages["rl"]["steps"] = 2
    for ev in stages["evals"]:
        ev.update({"arithmetic": {"problems": 8}, "mk_niah": {"samples": 2}}.get(ev["kind"], {}))
    note = "# The doc-command test's tiny graph: the repository's with its budgets cut (tests/test_doc_commands.py).\n"
    graph_path.write_text(note + yaml.safe_dump(graph, sort_keys=False))
    data_path.write_text(note + yaml.safe_dump(data, sort_keys=False))


def _workspace(tmp: Path) -> tuple[Path, dict[str, str]]:
    work = tmp / "work"
    for folder in ("graphs", "specs", "tests/graphs"):
        shutil.copytree(ROOT / folder, work / folder)
    shutil.copyfile(ROOT / "pyproject.toml", work / "pyproject.toml")
    _shrink_tiny(work)
    for doc in DOCS:
        for name, body in re.findall(r"```yaml\n# (graphs/[\w.-]+\.yaml)\n(.*?)```", (ROOT / doc).read_text(), re.S):
            assert not (work / name).exists(), f"{doc}: {name} would overwrite a graph of the repository"
            (work / name).write_text(body)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, line in [
        ("trinity", f'exec {sys.executable} -m trinity.cli "$@"'),
        ("python3", f'exec {sys.executable} "$@"'),
    ]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    shutil.copyfile(bin_dir / "python3", bin_dir / "python")
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return work, env


def _run(command: str, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )


def test_every_command_of_the_docs_runs_as_written(tmp_path: Path) -> None:
    commands = doc_commands()
    keys = {c.key for c in commands}
    stale = sorted((set(ELSEWHERE) | set(INSTEAD)) - keys)
    assert not stale, f"listed here but no longer in the docs: {stale}"
    for key, (file, text, _) in ELSEWHERE.items():
        assert text in (ROOT / file).read_text(), f"{key!r}: {file} no longer holds {text!r}"
    assert shutil.which("duckdb"), "the DuckDB CLI (pip package duckdb-cli, a dev dependency) is not installed"

    work, env = _workspace(tmp_path)
    for c in commands:
        if c.key in ELSEWHERE:
            continue
        command = INSTEAD[c.key][0] if c.key in INSTEAD else c.text
        for ablation, run in ABLATION_RUNS.items():
            command = command.replace(f"trinity sql {ablation} ", f"trinity sql {run} ")
        done = _run(command, work, env)
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"{c.where()}: `{command}` exited {done.returncode}:\n{said[-4000:]}"
        for expected in re.findall(r'"([^"]+)"', c.comment):
            assert expected in said, f"{c.where()}: `{command}` printed no {expected!r} (its comment says so):\n{said}"
