"""`trinity verify RUN [NODE]` on run directories whose files are damaged on disk: each problem is one line
naming the file, and the exit status says whether anything is damaged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import torch

from tests.cli_runs import NODE, trinity
from tests.store.conftest import P1
from trinity.run.layout import RunDir
from trinity.store.checkpoint import save_checkpoint
from trinity.store.verify import verify_run


def _checkpoints(run: RunDir) -> tuple[Path, Path]:
    """Two committed checkpoints of P1 (steps 6 and 10), each with a 2 MB array of its own."""
    root = run.node(P1).checkpoints
    paths = [
        save_checkpoint(root, step, {"model": {"w": torch.full((512, 1024), float(step))}, "step": step}, keep_last=0)
        for step in (6, 10)
    ]
    return paths[0], paths[1]


def test_an_intact_run_verifies(resumed_run: RunDir) -> None:
    _checkpoints(resumed_run)
    result = trinity("verify", str(resumed_run.root))
    assert result.returncode == 0, result.stdout + result.stderr
    parts = len(list((resumed_run.root / "nodes").rglob("*.parquet")))
    assert result.stdout.strip() == f"ok: 2 committed checkpoints and {parts} telemetry parts intact"
    report = verify_run(resumed_run.root, "pretrain/phase2")  # nothing stored: nothing damaged
    assert report.ok and (report.checkpoints, report.parts) == (0, 0)


def test_every_damaged_file_is_one_line(resumed_run: RunDir) -> None:
    step6, step10 = _checkpoints(resumed_run)
    (step10 / "%packed" / "c" / "0").unlink()  # the toy's 2 MiB weight is packed (under 8 MiB)
    chunk = step6 / "%packed" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[12345] ^= 1
    chunk.write_bytes(bytes(data))
    attempt1 = resumed_run.node(P1).telemetry(1)
    parts = sorted((p.name for p in attempt1.glob("*.parquet")), key=lambda name: name[-14:-8])  # by number
    middle = attempt1 / parts[len(parts) // 2]
    middle.unlink()
    truncated = sorted(resumed_run.node(P1).telemetry(2).glob("steps-*.parquet"))[0]
    truncated.write_bytes(truncated.read_bytes()[:-100])

    result = trinity("verify", str(resumed_run.root))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    seq = int(middle.name[-14:-8])
    assert lines == [
        f"damaged: {step6}: array %packed: chunk c/0 does not match its crc32 checksum in the COMMITTED marker "
        "(its bytes changed)",
        f"damaged: {step10}: array %packed: chunk c/0 is missing",
        f"damaged: {attempt1}: telemetry part {seq:06d} is missing (after {parts[len(parts) // 2 - 1]} and before "
        f"{parts[len(parts) // 2 + 1]}): its rows are lost",
        lines[3],
    ]
    assert lines[3].startswith(f"damaged: {truncated}: cannot be read as Parquet (") and "magic bytes" in lines[3]
    assert "error: 4 problems in 2 committed checkpoints" in result.stderr
    node2 = trinity("verify", str(resumed_run.root), "pretrain/phase2")
    assert node2.returncode == 0 and node2.stdout.startswith("ok: 0 committed checkpoints and 0 telemetry parts")
    unknown = trinity("verify", str(resumed_run.root), "pretrain/phase9")
    assert unknown.returncode == 2 and "no node 'pretrain/phase9' in this run" in unknown.stderr
    not_a_run = trinity("verify", str(resumed_run.root / "nodes"))
    assert not_a_run.returncode == 2 and "not a trinity run directory" in not_a_run.stderr


def test_a_set_aside_checkpoint_is_a_note_not_damage(resumed_run: RunDir) -> None:
    step6, _ = _checkpoints(resumed_run)
    step6.rename(step6.with_name(step6.name + ".damaged"))
    result = trinity("verify", str(resumed_run.root), P1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note: {step6}.damaged: set aside as damaged by a resume" in result.stderr
    assert result.stdout.startswith("ok: 1 committed checkpoints")


def test_verify_finds_a_lost_chunk_in_a_real_run(straight_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    assert trinity("verify", str(run), NODE).returncode == 0
    newest = sorted((RunDir(run).node(NODE).checkpoints).glob("step-*"))[-1]
    chunk = sorted(p for p in newest.rglob("c/*") if p.is_file())[0]
    chunk.unlink()
    result = trinity("verify", str(run))
    assert result.returncode == 2
    assert result.stdout.startswith(f"damaged: {newest}: array ") and "is missing" in result.stdout


def test_flipped_bits_inside_a_telemetry_page_are_found(resumed_run: RunDir) -> None:
    """Parts carry a CRC per page (written by TelemetryWriter), so a flip in compressed values, which zstd
    would often decode into different numbers without complaint, is damage that verify reports."""
    part = sorted(resumed_run.node(P1).telemetry(1).glob("steps-*.parquet"))[0]
    column = pq.read_metadata(part).row_group(0).column(pq.read_schema(part).names.index("loss"))
    data = bytearray(part.read_bytes())
    data[column.data_page_offset + column.total_compressed_size - 5] ^= 0x04  # in the loss page's payload
    part.write_bytes(bytes(data))
    report = verify_run(resumed_run.root, P1)
    assert [p.split(": ")[0] for p in report.problems] == [str(part)], report.problems
