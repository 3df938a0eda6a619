"""PNG plots of a run from its telemetry (read through the catalog, so resumes show each step once).

    loss.png                      loss against `steps.tokens` exactly as the table holds it, one panel
                                  per stage kind (pretrain, extend, sft, rl: each its own x and y;
                                  pretraining's tokens run on over its phases, the later stages count
                                  from 0), one line per phase and branch
    max_vio.png                   MaxVio against step, the mean over the MoE layers, one line per
                                  phase and branch, panels as loss.png (SMEBU vs sign on one axis)
    max_vio-<node>.png            MaxVio heatmap, MoE layer x step, per training node
    expert_load-<node>.png        load of each (layer, expert) relative to a perfectly balanced
                                  layer (1 = tokens / experts) x step, per node, at the logged cadence

Branches are named by their swept values, the branch label of their node ids (`muon.lr=0.02`,
`loader=rsdb`: trinity.graph.compile). Branches that differ only in the `seed` axis of a sweep are one
line: the mean over the seeds at each step that every seed logged, with a band from their minimum to
their maximum, "(3 seeds)" in the legend. The colour tells branches apart (shared nodes are black);
without a sweep it tells the phases apart.

The figures are built by functions that return them (`loss_figure`, `max_vio_figure`, the two
heatmaps) so that tests read the drawn data back; each line's `gid` is its series (node id without
the seed). Long runs are binned to at most `max_columns` step columns in the heatmaps (mean per
bin) so a heatmap stays readable and the query stays cheap.

`plot_compare` (trinity plot FOLDER --compare "GLOB or SQL") draws several runs on one axis per stage
kind: compare-loss.png (loss against `steps.tokens`) and compare-max_vio.png (MaxVio, mean over the MoE
layers, against step), one line per (run, training node), labelled `RUN: NODE` (RUN: the run directory's
path under FOLDER, NODE: the node id with its branch label), one colour per run, a line style per node.
The runs are chosen by a glob over those paths, or by a read-only SQL query over the folder's catalog that
returns a `run_id` column (and, to narrow to some nodes, a `node` column). Seeds are not averaged here:
each node is its own line, as `trinity sql` would list it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in a node process or over ssh

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trinity.errors import CatalogError
from trinity.store.catalog import open_catalog
from trinity.store.run_tables import find_runs
from trinity.store.sql import check_read_only

SEED_KEY = "seed"
"""The sweep axis whose branches are drawn as one line with a band (the experiment's `seed`)."""
PANEL_ORDER = ("pretrain", "extend", "sft", "rl")
"""Stage kinds in the order their panels are stacked; any other training kind follows."""
EXPERT_TICKS_MAX = 32
"""A heatmap with at most this many (layer, expert) rows labels every expert; more: one tick per layer."""
STYLES = ("-", "--", ":", "-.")
"""Line styles of a run's nodes in a comparison (its colour is the run's)."""
SQL_START = re.compile(r"^\s*(select|with|from|pivot|unpivot|\()", re.IGNORECASE)
"""A --compare argument that starts like this is SQL; anything else is a glob over run paths."""
SHARED = "shared by the branches"
"""Legend text of nodes the branches share (whose label holds no swept value but the seed), in a plot of branches."""


def slug(node_id: str) -> str:
    """A file-name-safe spelling of a node id: pretrain/phase1[lr=0.1] -> pretrain.phase1_lr=0.1_."""
    return re.sub(r"[^A-Za-z0-9=._-]", "_", node_id.replace("/", "."))


def _base(node_id: str) -> str:
    return node_id.split("[", 1)[0]


def split_seed(label: str) -> tuple[str, str | None]:
    """(branch label without its `seed=` part, the seed's text or None).

    A label is `key=value` parts joined by ',' (trinity.graph.compile._labels); neither a shown key
    or value nor a digest (`~` and hex) holds ',' or '=', so the parts split exactly. A label too long
    to show is one digest: it has no seed part to take out, and its branch stays a line of its own.
    """
    rest: list[str] = []
    seed: str | None = None
    for part in label.split(",") if label else []:
        key, _, value = part.partition("=")
        if key == SEED_KEY and seed is None:
            seed = value
        else:
            rest.append(part)
    return ",".join(rest), seed


@dataclass(frozen=True)
class Series:
    """One drawn line: the nodes of one phase and branch, one node per seed (their mean when several)."""

    kind: str
    """Stage kind: the panel."""
    base: str
    """Node id without the branch label (`pretrain/phase2`)."""
    group: str
    """Branch label without its seed part ('' for a shared node, or a sweep over seeds only)."""
    nodes: tuple[str, ...]
    """The nodes averaged, in graph order."""

    @property
    def gid(self) -> str:
        """The series' name on its matplotlib artists: the node id without the seed."""
        return f"{self.base}[{self.group}]" if self.group else self.base


def _series(con: Any, table: str) -> list[Series]:
    """The series of every node with rows in `table`, in graph order of their first node."""
    rows = con.execute(
        f"""
        SELECT n.node, n.kind, coalesce(n.branch, '') AS branch FROM nodes n
        WHERE n.node IN (SELECT DISTINCT node FROM {table}) ORDER BY n.position
        """
    ).fetchall()
    found: dict[tuple[str, str, str], list[str]] = {}
    for node, kind, branch in rows:
        group, _ = split_seed(branch)
        found.setdefault((kind, _base(node), group), []).append(node)
    return [Series(kind, base, group, tuple(nodes)) for (kind, base, group), nodes in found.items()]


@dataclass(frozen=True)
class Curve:
    """A series' values per step: the mean over its nodes, their min and max, at steps all of them logged."""

    step: npt.NDArray[np.int64]
    x: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]


def _curve(con: Any, per_node_step: str, nodes: Sequence[str]) -> Curve:
    """Aggregate `per_node_step` (columns node, step, x, v; parameter: the node list) over the nodes."""
    data = con.execute(
        f"""
        WITH per AS ({per_node_step})
        SELECT step, avg(x) AS x, avg(v) AS mean, min(v) AS low, max(v) AS high FROM per
        GROUP BY step HAVING count(DISTINCT node) = ? ORDER BY step
        """,
        [list(nodes), len(nodes)],
    ).fetchnumpy()
    return Curve(
        np.asarray(data["step"], dtype=np.int64),
        np.asarray(data["x"], dtype=np.float64),
        np.asarray(data["mean"], dtype=np.float64),
        np.asarray(data["low"], dtype=np.float64),
        np.asarray(data["high"], dtype=np.float64),
    )


def _panels(series: Sequence[Series]) -> list[str]:
    kinds = list(dict.fromkeys(s.kind for s in series))
    return sorted(kinds, key=lambda k: (PANEL_ORDER.index(k) if k in PANEL_ORDER else len(PANEL_ORDER), kinds.index(k)))


def _legend_names(series: Sequence[Series]) -> dict[Series, str]:
    """Legend text (the colour's name) per series: its branch's swept values when branches differ in more
    than the seed, else its phase (node id without branch label)."""
    by_branch = len({s.group for s in series}) > 1
    return {s: (s.group or SHARED) if by_branch else s.base for s in series}


def _figure(
    con: Any, table: str, per_node_step: dict[str, str], x_label: dict[str, str], y_label: str, title: str
) -> Figure | None:
    """Panels of series curves; `per_node_step[kind]` and `x_label[kind]` per stage kind of a panel."""
    series = _series(con, table)
    if not series:
        return None
    kinds = _panels(series)
    names = _legend_names(series)
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(n for n in names.values() if n != SHARED))}
    colours[SHARED] = "black"
    seeds: dict[str, set[int]] = {}
    for s in series:
        seeds.setdefault(names[s], set()).add(len(s.nodes))
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 1.0 + 3.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        labelled: set[str] = set()
        for s in (s for s in series if s.kind == kind):
            c = _curve(con, per_node_step[kind], s.nodes)
            if not len(c.step):
                continue
            name = names[s]
            colour = colours[name]
            legend = "_nolegend_"
            if name not in labelled:
                labelled.add(name)
                n = sorted(seeds[name])
                count = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
                legend = name if n == [1] else f"{name} ({count} seeds)"
            (line,) = ax.plot(c.x, c.mean, color=colour, lw=1.2, label=legend)
            line.set_gid(s.gid)
            if len(s.nodes) > 1:
                band = ax.fill_between(c.x, c.low, c.high, color=colour, alpha=0.2, lw=0)
                band.set_gid(s.gid)
        ax.set_title(f"{kind}: {title}", fontsize=10)
        ax.set_xlabel(x_label[kind])
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if any(len(s.nodes) > 1 for s in series):
        fig.text(0.01, 0.005, "line: mean over seeds at each step all of them logged; band: min to max", fontsize=7)
    return fig


def loss_figure(con: Any) -> Figure | None:
    """Loss against `steps.tokens` per stage kind (None: no node logged a loss)."""
    per_kind: dict[str, str] = {}
    x_label: dict[str, str] = {}
    for (kind,) in con.execute("SELECT DISTINCT kind FROM nodes").fetchall():
        (no_tokens,) = con.execute(
            "SELECT count(*) FROM steps WHERE tokens IS NULL AND node IN (SELECT node FROM nodes WHERE kind = ?)",
            [kind],
        ).fetchone()
        x = "step" if no_tokens else "tokens"  # telemetry written without tokens: steps, said on the axis
        per_kind[kind] = (
            f"SELECT node, step, {x} AS x, loss AS v FROM steps WHERE list_contains(?, node) AND loss IS NOT NULL"
        )
        x_label[kind] = (
            "step (some steps have no tokens)"
            if no_tokens
            else "tokens (steps.tokens: on over the pretraining phases)"
            if kind == "pretrain"
            else "tokens (steps.tokens: counted from 0 in this stage)"
        )
    return _figure(con, "steps", per_kind, x_label, "loss", "training loss")


def max_vio_figure(con: Any) -> Figure | None:
    """MaxVio (mean over MoE layers) against step per stage kind (None: no MoE telemetry)."""
    query = (
        "SELECT node, step, step AS x, avg(max_vio) AS v FROM moe_layers "
        "WHERE list_contains(?, node) GROUP BY node, step"
    )
    kinds = [k for (k,) in con.execute("SELECT DISTINCT kind FROM nodes").fetchall()]
    return _figure(
        con,
        "moe_layers",
        dict.fromkeys(kinds, query),
        dict.fromkeys(kinds, "step"),
        "MaxVio, mean over MoE layers",
        "MaxVio = (max load - mean) / mean",
    )


def _binned(
    con: Any, table: str, node: str, value: str, rows: str, max_columns: int
) -> tuple[npt.NDArray[np.float64], int, int]:
    """(matrix rows x columns of mean `value`, first step, last step) for one node; columns span equal steps."""
    lo, hi, n = con.execute(
        f"SELECT min(step), max(step), count(DISTINCT step) FROM {table} WHERE node = ?", [node]
    ).fetchone()
    bins = int(min(n, max_columns))
    width = (hi - lo + 1) / bins
    data = con.execute(
        f"""
        SELECT {rows} AS r, least(CAST(floor((step - ?) / ?) AS BIGINT), ? - 1) AS c, avg({value}) AS v
        FROM {table} WHERE node = ? GROUP BY ALL
        """,
        [lo, width, bins, node],
    ).fetchnumpy()
    n_rows = int(data["r"].max()) + 1
    matrix = np.full((n_rows, bins), np.nan)
    matrix[data["r"].astype(np.int64), data["c"].astype(np.int64)] = np.asarray(data["v"], dtype=np.float64)
    return matrix, int(lo), int(hi)


def _heatmap(matrix: npt.NDArray[np.float64], lo: int, hi: int, **kw: Any) -> tuple[Figure, Any]:
    """A heatmap whose columns span steps lo..hi, each step centred on its integer tick."""
    fig, ax = plt.subplots(figsize=(10, max(3.0, min(12.0, 0.25 * matrix.shape[0] + 2))))
    extent = (lo - 0.5, hi + 0.5, matrix.shape[0] - 0.5, -0.5)
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", extent=extent, **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax)
    return fig, ax


def max_vio_heatmap(con: Any, node: str, max_columns: int = 1000) -> Figure:
    """MaxVio per MoE layer (rows) and step (columns) of one node."""
    matrix, lo, hi = _binned(con, "moe_layers", node, "max_vio", "layer", max_columns)
    fig, ax = _heatmap(matrix, lo, hi, cmap="magma", vmin=0.0)
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(matrix.shape[0]))
    ax.set_title(f"{node}: MaxVio = (max load - mean) / mean")
    return fig


def expert_load_heatmap(con: Any, node: str, max_columns: int = 1000) -> Figure:
    """Load / balanced load per (layer, expert) row and step column of one node (1 = balanced)."""
    (E,) = con.execute("SELECT max(expert) + 1 FROM expert_load WHERE node = ?", [node]).fetchone()
    E = int(E)
    matrix, lo, hi = _binned(con, "expert_load", node, f"fraction * {E}", f"layer * {E} + expert", max_columns)
    top = max(2.0, float(np.nanmax(matrix)))
    fig, ax = _heatmap(matrix, lo, hi, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
    L = matrix.shape[0] // E
    if matrix.shape[0] <= EXPERT_TICKS_MAX:
        ax.set_yticks(range(matrix.shape[0]), [f"layer {r // E} expert {r % E}" for r in range(matrix.shape[0])])
        ax.tick_params(axis="y", labelsize=7)
    else:
        ax.set_yticks([layer * E + (E - 1) / 2 for layer in range(L)], [f"layer {layer}" for layer in range(L)])
    for layer in range(1, L):
        ax.axhline(layer * E - 0.5, color="black", lw=0.6)
    ax.set_ylabel(f"MoE layer x expert ({E} experts)")
    ax.set_title(f"{node}: expert load / balanced load (1 = tokens / {E})")
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None, max_columns: int = 1000) -> list[Path]:
    """Every plot of one run into `out_dir` (default RUN/plots); returns the files written.

    Raises CatalogError when the run holds no training telemetry (nothing to draw)."""
    runs = find_runs(Path(run_dir))
    if len(runs) != 1:
        raise CatalogError(f"{run_dir}: holds {len(runs)} runs; plot one run directory at a time")
    con = open_catalog(runs[0])
    try:
        if con.execute("SELECT count(*) FROM steps").fetchall() == [(0,)]:
            raise CatalogError(
                f"{runs[0]}: no telemetry to plot: no node of this run has logged a training step "
                "(nodes/<id>/telemetry/ holds no steps); run its training nodes first (`trinity run`), "
                "and see `trinity status` for where they stand"
            )
        out = Path(out_dir) if out_dir is not None else runs[0] / "plots"
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, make in (("loss.png", loss_figure), ("max_vio.png", max_vio_figure)):
            fig = make(con)
            if fig is not None:
                written.append(_save(fig, out / name))
        order = "SELECT node FROM nodes WHERE node IN (SELECT DISTINCT node FROM {t}) ORDER BY position"
        for (node,) in con.execute(order.format(t="moe_layers")).fetchall():
            written.append(_save(max_vio_heatmap(con, node, max_columns), out / f"max_vio-{slug(node)}.png"))
        for (node,) in con.execute(order.format(t="expert_load")).fetchall():
            written.append(_save(expert_load_heatmap(con, node, max_columns), out / f"expert_load-{slug(node)}.png"))
    finally:
        con.close()
    return written


@dataclass(frozen=True)
class Compared:
    """One line of a comparison: a training node of one run."""

    run_id: str
    run: str
    """The run as a reader names it: its directory's path under the folder compared (`lr-high`)."""
    node: str
    kind: str

    @property
    def label(self) -> str:
        """Legend text and the line's `gid`: `RUN: NODE`."""
        return f"{self.run}: {self.node}"


def _run_names(con: Any, root: Path) -> dict[str, str]:
    """run_id -> the run directory's path under `root` (its folder name when `root` is the run itself)."""
    names = {}
    for run_id, path in con.execute("SELECT run_id, path FROM runs ORDER BY path").fetchall():
        rel = os.path.relpath(path, root)
        names[run_id] = Path(path).name if rel == "." else rel
    return names


def compared(con: Any, root: Path, select: str) -> list[Compared]:
    """The (run, training node) pairs `select` chooses: a glob over the runs' paths under `root`, or a
    read-only SQL query returning `run_id` (and optionally `node`). Training nodes: those with `steps` rows.
    Raises CatalogError naming the runs when nothing matches."""
    names = _run_names(con, root)
    wanted: set[tuple[str, str | None]]
    if SQL_START.match(select):
        check_read_only(select, con)
        try:
            cursor = con.execute(select)
        except duckdb.Error as exc:  # a query that does not run is the user's to fix
            raise CatalogError(f"--compare query failed: {exc}") from None
        columns = [d[0] for d in cursor.description or []]
        if "run_id" not in columns:
            raise CatalogError(
                f"--compare query returns columns {', '.join(columns)}: it must return run_id (and, to choose "
                'nodes, node), e.g. SELECT run_id FROM spec WHERE "optim.muon.lr" > 0.01'
            )
        r, n = columns.index("run_id"), columns.index("node") if "node" in columns else None
        wanted = {(str(row[r]), None if n is None else str(row[n])) for row in cursor.fetchall()}
    else:
        wanted = {(run_id, None) for run_id, name in names.items() if fnmatch.fnmatchcase(name, select)}
    rows = con.execute(
        "SELECT run_id, node, kind FROM nodes WHERE node IN (SELECT DISTINCT node FROM steps s "
        "WHERE s.run_id = nodes.run_id) ORDER BY run_id, position"
    ).fetchall()
    chosen = [
        Compared(run_id, names[run_id], node, kind)
        for run_id, node, kind in rows
        if (run_id, None) in wanted or (run_id, node) in wanted
    ]
    if not chosen:
        shown = ", ".join(names.values())
        raise CatalogError(
            f"--compare {select!r} chooses no training node with telemetry under {root} (runs: {shown}); a glob "
            "matches these run paths, SQL must return their run_id"
        )
    return sorted(chosen, key=lambda c: (c.run, c.run_id))


def _compare_figure(con: Any, lines: Sequence[Compared], query: str, x_label: str, y_label: str) -> Figure | None:
    """One panel per stage kind, one line per (run, node); `query` (parameters run_id, node) gives x, v rows."""
    drawn = [(c, con.execute(query, [c.run_id, c.node]).fetchnumpy()) for c in lines]
    drawn = [(c, d) for c, d in drawn if len(d["x"])]
    if not drawn:
        return None
    kinds = _panels([Series(c.kind, c.node, "", ()) for c, _ in drawn])
    colours = {run: f"C{i % 10}" for i, run in enumerate(dict.fromkeys(c.run_id for c, _ in drawn))}
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 1.0 + 3.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        styles: dict[str, dict[str, str]] = {}
        for c, d in ((c, d) for c, d in drawn if c.kind == kind):
            style = styles.setdefault(c.run_id, {}).setdefault(c.node, STYLES[len(styles[c.run_id]) % len(STYLES)])
            x = np.asarray(d["x"], dtype=np.float64)
            (line,) = ax.plot(x, np.asarray(d["v"], dtype=np.float64), color=colours[c.run_id], ls=style, lw=1.2)
            line.set_label(c.label)
            line.set_gid(c.label)
        ax.set_title(f"{kind}: {y_label} by run", fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def compare_loss_figure(con: Any, lines: Sequence[Compared]) -> Figure | None:
    """Loss against `steps.tokens` (step where a row has no tokens) of each line."""
    query = (
        "SELECT coalesce(tokens, step) AS x, loss AS v FROM steps "
        "WHERE run_id = ? AND node = ? AND loss IS NOT NULL ORDER BY step"
    )
    return _compare_figure(con, lines, query, "tokens (steps.tokens)", "training loss")


def compare_max_vio_figure(con: Any, lines: Sequence[Compared]) -> Figure | None:
    """MaxVio, the mean over MoE layers, against step of each line (None: no MoE telemetry)."""
    query = (
        "SELECT step AS x, avg(max_vio) AS v FROM moe_layers WHERE run_id = ? AND node = ? GROUP BY step ORDER BY step"
    )
    return _compare_figure(con, lines, query, "step", "MaxVio, mean over MoE layers")


def plot_compare(folder: Path | str, select: str, out_dir: Path | str | None = None) -> list[Path]:
    """compare-loss.png and compare-max_vio.png of the runs under `folder` that `select` chooses (see
    `compared`), into `out_dir` (default FOLDER/plots); returns the files written."""
    root = Path(folder).resolve()
    con = open_catalog(root)
    try:
        lines = compared(con, root, select)
        out = Path(out_dir) if out_dir is not None else root / "plots"
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, make in (("compare-loss.png", compare_loss_figure), ("compare-max_vio.png", compare_max_vio_figure)):
            fig = make(con, lines)
            if fig is not None:
                written.append(_save(fig, out / name))
    finally:
        con.close()
    return written
