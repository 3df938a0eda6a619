"""Plots: the PNG files exist and hold real images, and what they draw is the telemetry: the figures are
caught as `plot_run` saves them (Figure.savefig) and their lines, legends, bands and heatmap cells are read
back and compared with a DuckDB query of the same run or a closed form of the values written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import numpy.typing as npt
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tests.cli_runs import trinity
from tests.store.conftest import E, L
from trinity.errors import CatalogError
from trinity.graph.compile import _labels
from trinity.run.layout import RunDir, atomic_write_json
from trinity.store.catalog import open_catalog
from trinity.store.plots import plot_run, slug, split_seed
from trinity.store.telemetry import TelemetryWriter


def test_plot_run_writes_loss_maxvio_and_expert_load(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None]
) -> None:
    nodes: list[tuple[str, str, dict[str, Any]]] = [
        ("tokenizer", "tokenizer", {}),
        ("pretrain/phase1", "pretrain", {}),
        ("pretrain/phase2", "pretrain", {}),
    ]
    run = make_run(tmp_path / "r", "r", nodes)
    write_attempt(run, "r", "pretrain/phase1", 1, range(1, 31), state="FAILED")
    write_attempt(run, "r", "pretrain/phase1", 2, range(21, 41), resumed_from_step=20)
    write_attempt(run, "r", "pretrain/phase2", 1, range(1, 21), loss_offset=-0.2, phase="phase2")
    written = plot_run(run.root)
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["loss.png", "max_vio.png"]
        + [f"{kind}-pretrain.phase{i}.png" for kind in ("max_vio", "expert_load") for i in (1, 2)]
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


# -- what the figures draw -------------------------------------------------------------------------


def _data_lines(fig: Figure) -> list[Line2D]:
    return [line for ax in fig.axes for line in ax.get_lines() if len(_xy(line)[0])]


def _xy(line: Line2D) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    return np.asarray(line.get_xdata(), dtype=np.float64), np.asarray(line.get_ydata(), dtype=np.float64)


def _line_of(fig: Figure, y: Any) -> Line2D:
    """The one drawn line whose y data are `y`."""
    y = np.asarray(y, dtype=np.float64)
    found = [ln for ln in _data_lines(fig) if len(_xy(ln)[1]) == len(y) and np.allclose(_xy(ln)[1], y)]
    assert len(found) == 1, f"{len(found)} lines draw these values"
    return found[0]


def _legend(fig: Figure) -> dict[str, Any]:
    """Legend text -> handle, over every panel of the figure."""
    out: dict[str, Any] = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            out |= {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    return out


def _style(artist: Any) -> tuple[tuple[float, ...], str]:
    return to_rgba(artist.get_color()), str(artist.get_linestyle())


def _points(xs: Any, ys: Any) -> set[tuple[float, float]]:
    return {(round(float(a), 6), round(float(b), 6)) for a, b in zip(xs, ys, strict=True)}


def _branch_run(make_run: Callable[..., RunDir], root: Path, nodes: list[tuple[str, str, str]]) -> RunDir:
    """A run whose graph.json gives each node (id, kind, branch label) its branch, as a compiled sweep does."""
    run = make_run(root, "r", [(node, kind, {}) for node, kind, _ in nodes])
    graph = json.loads(run.graph_json.read_text())
    for entry, (_, _, branch) in zip(graph["nodes"], nodes, strict=True):
        entry["branch"] = branch
    atomic_write_json(run.graph_json, graph)
    return run


def _log(run: RunDir, node: str, steps: range, offset: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Telemetry of one attempt: loss = 10 / step + offset, tokens = 1024 x step; returns the MoE counts
    (step x layer x expert). No expert load (heatmaps of their own tests)."""
    counts = rng.integers(1, 100, size=(len(steps), L, E))
    with TelemetryWriter(run.node(node), node, 1, "r", flush_rows=64, tensorboard=False, expert_load_every=10**6) as w:
        for i, s in enumerate(steps):
            w.log_step(s, tokens=1024 * s, loss=10.0 / s + offset, phase="main")
            w.log_moe(s, counts[i])
    return counts.astype(np.float64)


def test_loss_is_drawn_at_steps_tokens_one_panel_per_stage_kind(
    tmp_path: Path,
    make_run: Callable[..., RunDir],
    write_attempt: Callable[..., None],
    drawn: dict[str, Figure],
) -> None:
    nodes = ["pretrain/phase1", "pretrain/phase2", "sft", "rl"]
    run = make_run(tmp_path / "r", "r", [(n, n.split("/")[0], {}) for n in nodes])
    write_attempt(run, "r", nodes[0], 1, range(1, 9), state="FAILED")
    write_attempt(run, "r", nodes[0], 2, range(5, 11), resumed_from_step=4)  # steps shows 1..10 once
    rng = np.random.default_rng(0)
    _log(run, nodes[1], range(11, 17), -0.2, rng)  # pretraining's steps and tokens go on over its phases
    _log(run, nodes[2], range(1, 7), -0.5, rng)  # a later stage counts from 0
    _log(run, nodes[3], range(1, 7), -10.0, rng)  # RL's loss: near 0
    plot_run(run.root)
    fig = drawn["loss.png"]
    con = open_catalog(run.root)
    axes = {}
    for node in nodes:
        data = con.execute("SELECT tokens, loss FROM steps WHERE node = ? ORDER BY step", [node]).fetchnumpy()
        line = _line_of(fig, data["loss"])
        np.testing.assert_array_equal(_xy(line)[0], data["tokens"])  # x is steps.tokens, no offset added
        axes[node] = line.axes
    con.close()
    assert axes["pretrain/phase1"] is axes["pretrain/phase2"]
    assert len({id(axes[n]) for n in nodes[1:]}) == 3  # a panel per stage kind; RL's y axis is its own
    rl = axes["rl"]
    assert rl is not None and rl.get_ylim()[1] < 1.0  # not stretched to pretraining's losses


def test_legend_names_each_branch_by_its_swept_values_with_its_own_style(
    tmp_path: Path, make_run: Callable[..., RunDir], drawn: dict[str, Figure]
) -> None:
    """The off-by-one case of the old plot: every training node is in a branch (only the tokenizer is shared)."""
    labels = ["muon.lr=0.01", "muon.lr=0.02"]
    nodes = [("tokenizer", "tokenizer", "")]
    nodes += [(f"pretrain/phase{p}[{b}]", "pretrain", b) for p in (1, 2) for b in labels]
    run = _branch_run(make_run, tmp_path / "r", nodes)
    rng = np.random.default_rng(0)
    for i, (node, _, _) in enumerate(nodes[1:]):
        _log(run, node, range(1, 7) if "phase1" in node else range(7, 13), 0.3 * i, rng)
    plot_run(run.root)
    fig = drawn["loss.png"]
    legend = _legend(fig)
    con = open_catalog(run.root)
    for label in labels:
        branch = con.execute("SELECT node FROM nodes WHERE branch = ?", [label]).fetchall()
        query = "SELECT loss FROM steps WHERE node = ? ORDER BY step"
        expected = {id(_line_of(fig, con.execute(query, [n]).fetchnumpy()["loss"])) for (n,) in branch}
        styled = {id(ln) for ln in _data_lines(fig) if _style(ln) == _style(legend[label])}
        assert styled == expected, f"the legend's {label} style is not the style of that branch's lines"
    con.close()
    assert sorted(legend) == labels  # the swept values name the lines; phases are not legend entries of their own


def test_seed_branches_are_one_line_the_mean_with_a_min_max_band(
    tmp_path: Path, make_run: Callable[..., RunDir], drawn: dict[str, Figure]
) -> None:
    """A sweep of seed x loader: per loader, the loss and the layer-mean MaxVio averaged over the seeds at
    the steps every seed logged (one seed of rsdb stopped at step 5), against their closed forms."""
    offsets = {0: 0.0, 1: 0.3, 2: 0.05}
    loaders = {"rsdb": 0.0, "sequential": 0.7}
    last = {"rsdb": 5, "sequential": 7}  # the last step all three seeds logged
    nodes = [
        (f"pretrain/main[seed={s},main.loader={loader}]", "pretrain", f"seed={s},main.loader={loader}")
        for s in offsets
        for loader in loaders
    ]
    run = _branch_run(make_run, tmp_path / "r", nodes)
    rng = np.random.default_rng(1)
    vio: dict[str, list[npt.NDArray[np.float64]]] = {loader: [] for loader in loaders}
    for node, _, branch in nodes:
        seed, loader = int(branch[5]), branch.rsplit("=", 1)[1]
        counts = _log(
            run, node, range(1, 6 if (seed, loader) == (2, "rsdb") else 8), offsets[seed] + loaders[loader], rng
        )
        mean = counts.mean(axis=2)
        vio[loader].append(((counts.max(axis=2) - mean) / mean).mean(axis=1))  # MaxVio, mean over layers
    plot_run(run.root)
    for name in ("loss.png", "max_vio.png"):
        legend = _legend(drawn[name])
        assert sorted(legend) == [f"main.loader={loader} (3 seeds)" for loader in loaders]
        for loader, shift in loaders.items():
            steps = np.arange(1, last[loader] + 1, dtype=np.float64)
            x = 1024.0 * steps if name == "loss.png" else steps
            if name == "loss.png":
                per_seed = np.stack([10.0 / steps + o + shift for o in offsets.values()])
            else:
                per_seed = np.stack([v[: len(steps)] for v in vio[loader]])
            handle = legend[f"main.loader={loader} (3 seeds)"]
            (line,) = [ln for ln in _data_lines(drawn[name]) if _style(ln) == _style(handle)]
            np.testing.assert_allclose(_xy(line)[0], x)
            np.testing.assert_allclose(_xy(line)[1], per_seed.mean(axis=0))
            ax = line.axes
            assert ax is not None
            colour = _style(handle)[0][:3]
            (band,) = [c for c in ax.collections if tuple(np.asarray(c.get_facecolor(), dtype=float)[0, :3]) == colour]
            corners = _points(*np.asarray(band.get_paths()[0].vertices).T)
            assert _points(x, per_seed.min(axis=0)) <= corners and _points(x, per_seed.max(axis=0)) <= corners


def test_plot_without_telemetry_is_an_error(tmp_path: Path, make_run: Callable[..., RunDir]) -> None:
    run = make_run(tmp_path / "r", "r", [("tokenizer", "tokenizer", {}), ("pretrain/phase1", "pretrain", {})])
    result = trinity("plot", str(run.root), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no telemetry to plot" in result.stderr and "trinity run" in result.stderr


def test_expert_load_of_one_step_has_integer_step_ticks_and_expert_labels(
    tmp_path: Path, make_run: Callable[..., RunDir], write_attempt: Callable[..., None], drawn: dict[str, Figure]
) -> None:
    run = make_run(tmp_path / "r", "r", [("pretrain/phase1", "pretrain", {})])
    write_attempt(run, "r", "pretrain/phase1", 1, range(2, 3))  # expert load is logged at step 2 only
    plot_run(run.root)
    ax = drawn["expert_load-pretrain.phase1.png"].axes[0]
    left, right = ax.get_xlim()
    assert [t for t in ax.get_xticks() if left <= t <= right] == [2.0]  # the one step, at its own integer
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"layer {i} expert {e}" for i in range(L) for e in range(E)]
    con = open_catalog(run.root)
    query = "SELECT layer * ? + expert AS r, fraction * ? AS v FROM expert_load ORDER BY r"
    cells = con.execute(query, [E, E]).fetchnumpy()
    con.close()
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array())[:, 0], cells["v"])


def test_split_seed_takes_the_seed_out_of_compiled_branch_labels() -> None:
    """Against the labels the graph compiler makes (trinity.graph.compile), digests and long labels included."""
    keys = ["seed", "data.phases.main.loader", "model.seed_like"]
    points = [(s, {"kind": k, "buffer_size": 64}, "a/b") for s in (0, 1) for k in ("rsdb", "sequential")]
    labels = _labels(keys, points)
    assert [split_seed(label)[1] for label in labels] == ["0", "0", "1", "1"]
    rests = [split_seed(label)[0] for label in labels]
    assert rests[0] == rests[2] != rests[1] == rests[3] and all("seed=" not in r for r in rests)
    assert rests[0].startswith("main.loader=rsdb,model.seed_like=~")  # a digest value stays as it is
    wide = [f"x.long_key_{i}" for i in range(6)]
    long = _labels(["seed", *wide], [(0, *(f"long_value_{i}" for i in range(6)))])  # > 128 characters: a digest
    assert long[0].startswith("~") and split_seed(long[0]) == (long[0], None)
    assert split_seed("") == ("", None) and split_seed("muon.lr=0.01") == ("muon.lr=0.01", None)
