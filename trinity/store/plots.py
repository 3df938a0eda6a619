"""PNG plots of a run from its telemetry (read through the catalog, so resumes show each step once).

    loss.png                      loss of every training node on one cumulative-token axis: the
                                  phases of a branch follow each other in graph order, one colour
                                  per phase (node id without the sweep label), one line style per
                                  sweep branch
    max_vio-<node>.png            MaxVio heatmap, MoE layer x step, per training node
    expert_load-<node>.png        load of each (layer, expert) relative to a perfectly balanced
                                  layer (1 = tokens / experts) x step, per node, at the logged cadence

Long runs are binned to at most `max_columns` step columns (mean per bin) so a heatmap stays
readable and the query stays cheap.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in a node process or over ssh

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.colors import TwoSlopeNorm

from trinity.errors import CatalogError
from trinity.store.catalog import open_catalog
from trinity.store.run_tables import find_runs

LINESTYLES = ("-", "--", ":", "-.")


def slug(node_id: str) -> str:
    """A file-name-safe spelling of a node id: pretrain/phase1[lr=0.1] -> pretrain.phase1_lr=0.1_."""
    return re.sub(r"[^A-Za-z0-9=._-]", "_", node_id.replace("/", "."))


def _base(node_id: str) -> str:
    return node_id.split("[", 1)[0]


def plot_loss(con: Any, out: Path) -> Path | None:
    """One figure: loss against cumulative tokens over the training nodes of every branch."""
    nodes = con.execute(
        """
        SELECT n.node, coalesce(n.branch, '') AS branch, n.position
        FROM nodes n WHERE EXISTS (SELECT 1 FROM steps s WHERE s.run_id = n.run_id AND s.node = n.node)
        ORDER BY n.position
        """
    ).fetchall()
    if not nodes:
        return None
    branches = sorted({b for _, b, _ in nodes})
    colours = {p: f"C{i % 10}" for i, p in enumerate(dict.fromkeys(_base(n) for n, _, _ in nodes))}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    offsets: dict[str, float] = {}
    labelled: set[str] = set()
    for node, branch, _ in nodes:
        data = con.execute(
            "SELECT step, tokens, loss FROM steps WHERE node = ? AND loss IS NOT NULL ORDER BY step", [node]
        ).fetchnumpy()
        if not len(data["step"]):
            continue
        x = data["tokens"].astype(np.float64) if not np.ma.is_masked(data["tokens"]) else None
        if x is None:
            x = data["step"].astype(np.float64)
        # Shared nodes (no branch label) start every branch; branch nodes continue their own chain.
        chain = branch or ""
        start = offsets.get(chain, offsets.get("", 0.0))
        x = x + start
        offsets[chain] = float(x[-1])
        if not branch:
            for b in branches:
                offsets[b] = float(x[-1])
        phase = _base(node)
        style = LINESTYLES[branches.index(branch) % len(LINESTYLES)] if branch else "-"
        label = phase if phase not in labelled else None
        labelled.add(phase)
        ax.plot(
            x, np.asarray(data["loss"], dtype=np.float64), color=colours[phase], linestyle=style, lw=1.2, label=label
        )
    for i, b in enumerate(b for b in branches if b):
        ax.plot([], [], color="grey", linestyle=LINESTYLES[(i + 1) % len(LINESTYLES)], label=b)
    ax.set_xlabel("tokens (cumulative over phases)")
    ax.set_ylabel("loss")
    ax.set_title("training loss per phase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _binned(
    con: Any, table: str, node: str, value: str, rows: str, max_columns: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(matrix rows x columns of mean `value`, the first step of each column) for one node."""
    lo, hi, n = con.execute(
        f"SELECT min(step), max(step), count(DISTINCT step) FROM {table} WHERE node = ?", [node]
    ).fetchone()
    bins = int(min(n, max_columns))
    width = (hi - lo + 1) / bins
    data = con.execute(
        f"""
        SELECT {rows} AS r, least(CAST(floor((step - ?) / ?) AS BIGINT), ? - 1) AS c, avg({value}) AS v, min(step) AS s
        FROM {table} WHERE node = ? GROUP BY ALL
        """,
        [lo, width, bins, node],
    ).fetchnumpy()
    n_rows = int(data["r"].max()) + 1
    matrix = np.full((n_rows, bins), np.nan)
    matrix[data["r"].astype(np.int64), data["c"].astype(np.int64)] = np.asarray(data["v"], dtype=np.float64)
    starts = np.full(bins, hi, dtype=np.int64)
    np.minimum.at(starts, data["c"].astype(np.int64), data["s"].astype(np.int64))
    return matrix, starts


def _heatmap(matrix: npt.NDArray[np.float64], steps: npt.NDArray[np.int64], **kw: Any) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(10, max(3.0, min(12.0, 0.25 * matrix.shape[0] + 2))))
    extent = (float(steps[0]), float(steps[-1]) + 1, matrix.shape[0] - 0.5, -0.5)
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", extent=extent, **kw)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax)
    return fig, ax


def plot_max_vio(con: Any, node: str, out: Path, max_columns: int = 1000) -> Path:
    matrix, steps = _binned(con, "moe_layers", node, "max_vio", "layer", max_columns)
    fig, ax = _heatmap(matrix, steps, cmap="magma", vmin=0.0)
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(matrix.shape[0]))
    ax.set_title(f"{node}: MaxVio = (max load - mean) / mean")
    path = out / f"max_vio-{slug(node)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(con: Any, node: str, out: Path, max_columns: int = 1000) -> Path:
    (E,) = con.execute("SELECT max(expert) + 1 FROM expert_load WHERE node = ?", [node]).fetchone()
    matrix, steps = _binned(con, "expert_load", node, f"fraction * {int(E)}", f"layer * {int(E)} + expert", max_columns)
    top = max(2.0, float(np.nanmax(matrix)))
    fig, ax = _heatmap(matrix, steps, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
    L = matrix.shape[0] // int(E)
    ax.set_yticks([layer * E + (E - 1) / 2 for layer in range(L)], [f"layer {layer}" for layer in range(L)])
    for layer in range(1, L):
        ax.axhline(layer * E - 0.5, color="black", lw=0.6)
    ax.set_ylabel(f"MoE layer x expert ({E} experts)")
    ax.set_title(f"{node}: expert load / balanced load (1 = tokens / {E})")
    path = out / f"expert_load-{slug(node)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None, max_columns: int = 1000) -> list[Path]:
    """Every plot of one run into `out_dir` (default RUN/plots); returns the files written."""
    runs = find_runs(Path(run_dir))
    if len(runs) != 1:
        raise CatalogError(f"{run_dir}: holds {len(runs)} runs; plot one run directory at a time")
    out = Path(out_dir) if out_dir is not None else runs[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    con = open_catalog(runs[0])
    try:
        written = [p for p in [plot_loss(con, out)] if p is not None]
        order = "SELECT node FROM nodes WHERE node IN (SELECT DISTINCT node FROM {t}) ORDER BY position"
        for (node,) in con.execute(order.format(t="moe_layers")).fetchall():
            written.append(plot_max_vio(con, node, out, max_columns))
        for (node,) in con.execute(order.format(t="expert_load")).fetchall():
            written.append(plot_expert_load(con, node, out, max_columns))
    finally:
        con.close()
    return written
