"""Plots: the PNG files of a resumed two-phase run exist and hold real images; `trinity plot` on a real run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from tests.cli_runs import trinity
from trinity.errors import CatalogError
from trinity.run.layout import RunDir
from trinity.store.plots import plot_run, slug


def test_plot_run_writes_loss_maxvio_and_expert_load(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]
) -> None:
    nodes = [("tokenizer", "tokenizer", {}), ("pretrain/phase1", "pretrain", {}), ("pretrain/phase2", "pretrain", {})]
    run = make_run(tmp_path / "r", "r", nodes)
    write_attempt(run, "r", "pretrain/phase1", 1, range(1, 31), state="FAILED")
    write_attempt(run, "r", "pretrain/phase1", 2, range(21, 41), resumed_from_step=20)
    write_attempt(run, "r", "pretrain/phase2", 1, range(1, 21), loss_offset=-0.2, phase="phase2")
    written = plot_run(run.root)
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["loss.png"] + [f"{kind}-pretrain.phase{i}.png" for kind in ("max_vio", "expert_load") for i in (1, 2)]
    )
    for p in written:
        assert p.parent == run.root / "plots" and p.stat().st_size > 10_000
        image = mpimg.imread(p)
        assert image.ndim == 3 and np.std(image[..., :3]) > 0.05, f"{p.name} looks blank"


def test_plot_refuses_a_folder_of_runs(tmp_path: Path, make_run: Callable[..., RunDir]) -> None:
    make_run(tmp_path / "runs" / "a", "a", [("pretrain/phase1", "pretrain", {})])
    make_run(tmp_path / "runs" / "b", "b", [("pretrain/phase1", "pretrain", {})])
    with pytest.raises(CatalogError, match="holds 2 runs"):
        plot_run(tmp_path / "runs", tmp_path / "out")


def test_slug() -> None:
    assert slug("pretrain/phase1[muon.lr=0.002]") == "pretrain.phase1_muon.lr=0.002_"


def test_plot_writes_pngs(straight_run: Path, tmp_path: Path) -> None:
    result = trinity("plot", str(straight_run), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
