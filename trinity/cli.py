"""The `trinity` command line: validate, plan, graph, schema, diff.

Every command that reads a graph file takes `--set FIELD.PATH=VALUE` (repeatable). A bad spec
prints one line per problem (`file:line: field message`) and exits with status 2; any other trinity
error (`trinity.errors.TrinityError`: a run directory, a node, telemetry) prints one line and exits
with status 2 too; anything unexpected (a bug) prints one line and exits 1. `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from trinity.cli_errors import err, handles_errors, out, shown
from trinity.errors import SpecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Declarative experiment graphs for training Trinity-style sparse MoE language models.",
)
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: FIELD.PATH=VALUE (repeatable; list items by index or name)."),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
GraphArg = Annotated[Path, typer.Argument(help="Graph file (YAML).")]


def _load(graph: Path, sets: list[str] | None) -> Any:
    from trinity.spec.loading import load_experiment

    return load_experiment(graph, sets or [])


@app.command()
@handles_errors
def validate(graph: GraphArg, set_: SetOption = None, debug: DebugOption = False) -> None:
    """Check a graph file against the spec models and the cross-field rules."""
    from trinity.graph.compile import compile_graph
    from trinity.nodes.init_source import check_init_architectures

    loaded = _load(graph, set_)
    compiled = compile_graph(loaded)
    check_init_architectures(loaded, compiled)  # needs the model floor, above the compiler's
    n = compiled.number_of_nodes()
    out.print(f"[green]ok[/]: {shown(graph)} ({loaded.spec.name}: {n} nodes)", highlight=False, emoji=False)


@app.command()
@handles_errors
def plan(
    graph: GraphArg,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    trace: Annotated[
        bool,
        typer.Option(
            "--trace",
            help="Also run one training step of each stage's layout at the spec's world size on fake tensors "
            "and report what one rank holds (minutes for the largest presets).",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Show the nodes to run, their identities and what the experiment will cost."""
    from trinity.graph.plan import build_plan

    loaded = _load(graph, set_)
    result = build_plan(loaded)
    _mark_store_hits(result, loaded.spec.execution.store)
    from trinity.data.stream_estimate import stream_estimates

    result["data_streams"] = stream_estimates(loaded.spec, loaded.base_dir)
    report = None
    if trace:
        from trinity.distributed.trace import trace_plan

        with err.status("tracing one training step per stage (fake tensors, fake process group)") as status:
            report = trace_plan(loaded.spec, on_stage=lambda s: status.update(f"tracing one training step of: {s}"))
        result["trace"] = report.to_json()
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        from trinity.cli_render import print_plan

        print_plan(out, result)
    if report is not None:
        from trinity.distributed.trace import check_fits

        check_fits(report, loaded.spec)


def _mark_store_hits(plan: dict[str, Any], store_setting: str | None) -> None:
    """Each node the shared store (execution.store) holds a whole entry of gets `reused_from` (a damaged one:
    `store_problem`): a run would link it instead of running the node."""
    from trinity.run.shared_store import SharedStore

    store = SharedStore.of(store_setting)
    if store is None:
        return
    for node in plan["nodes"]:
        found = store.find(node["identity"])
        if found.usable:
            node["reused_from"] = str(found.path)
        elif found.problem is not None:
            node["store_problem"] = f"{found.path}: {found.problem}"


@app.command("graph")
@handles_errors
def graph_cmd(
    graph: GraphArg,
    fmt: Annotated[str, typer.Option("--format", "-f", help="mermaid or dot.")] = "mermaid",
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Print the DAG as Mermaid or Graphviz dot."""
    from trinity.graph.compile import compile_graph
    from trinity.graph.render import to_dot, to_mermaid

    renderers = {"mermaid": to_mermaid, "dot": to_dot}
    if fmt not in renderers:
        raise SpecError([f"--format {fmt!r}: allowed: mermaid, dot"])
    sys.stdout.write(renderers[fmt](compile_graph(_load(graph, set_))))


@app.command()
@handles_errors
def schema(debug: DebugOption = False) -> None:
    """Print the JSON Schema of graph files (for editors and external checks)."""
    from trinity.spec.schema import graph_file_schema

    sys.stdout.write(json.dumps(graph_file_schema(), indent=2) + "\n")


@app.command()
@handles_errors
def diff(
    graph_a: Annotated[Path, typer.Argument(help="The graph before.")],
    graph_b: Annotated[Path, typer.Argument(help="The graph after.")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    debug: DebugOption = False,
) -> None:
    """Show changed fields between two graphs and which nodes the change re-runs. --set applies to B."""
    from trinity.graph.diff import diff_specs

    result = diff_specs(_load(graph_a, None), _load(graph_b, set_))
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, default=str) + "\n")
        return
    from trinity.cli_render import print_diff

    print_diff(out, result)


RunDirArg = Annotated[Path, typer.Argument(help="Run directory.")]
NodesOption = Annotated[
    list[str] | None,
    typer.Option(
        "--nodes",
        help="Run only this node id, or the nodes matching this glob (and what they depend on); repeatable. "
        "A sweep branch's id is taken as written: --nodes 'pretrain/phase2\\[muon.lr=0.02]'.",  # \\[: rich
    ),
]
JobsOption = Annotated[int, typer.Option("--jobs", "-j", help="Nodes run at once (local executor).")]


ExecutorOption = Annotated[
    str | None, typer.Option("--executor", help="local or slurm (default: the spec's execution.executor).")
]
WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Slurm: watch the jobs until the graph settles.")]
DetachOption = Annotated[
    bool,
    typer.Option(
        "--detach",
        help="Local executor: launch nodes that run on by themselves if this command ends (killed, terminal "
        "closed, Ctrl-C: it then leaves them running). Follow them with `trinity status RUN_DIR`; once they end, "
        "`trinity resume RUN_DIR` runs what remains. Without it, nodes stop at a checkpoint when this command ends.",
    ),
]


@app.command()
@handles_errors
def run(
    graph: GraphArg,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: RUN_ROOT/NAME).")] = None,
    set_: SetOption = None,
    nodes: NodesOption = None,
    jobs: JobsOption = 1,
    executor: ExecutorOption = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print whether each node would run or be reused and why (on Slurm: the sbatch parameters of "
            "those that run); run, submit and write nothing.",
        ),
    ] = False,
    wait: WaitOption = True,
    detach: DetachOption = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Run even though another graph file than the run directory's, or a --set it was made with "
            "and not given now, supersedes nodes (their folders move to RUN/superseded/, kept).",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Run a graph: create (or continue) its run directory and execute the nodes that must run.

    Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop the running nodes at a committed checkpoint; the exit
    status is then 128 + the signal number (130, 143, 129). Running nodes never outlive this command, even
    if it is killed (they stop at a checkpoint by themselves), unless it runs with --detach."""
    from trinity.execute.commands import dry_run as plan_jobs
    from trinity.execute.commands import run_graph
    from trinity.execute.scheduler import SchedulerStopped

    sets = list(set_ or [])
    if executor is not None:
        if executor not in ("local", "slurm"):
            raise SpecError([f"--executor {executor!r}: allowed: local, slurm"])
        sets.append(f"execution.executor={executor}")  # execution fields never change identities
    if dry_run:
        from trinity.cli_render import print_dry_run

        print_dry_run(out, *plan_jobs(graph, sets, nodes, run_dir))
        return
    try:
        code = run_graph(graph, sets, run_dir, out, nodes, jobs, wait, detach, force)
    except SchedulerStopped as stopped:
        err.print(f"[yellow]interrupted[/] ({stopped.signal_name}): {shown(stopped.message)}", highlight=False)
        raise typer.Exit(stopped.exit_code) from None
    raise typer.Exit(code)


@app.command()
@handles_errors
def resume(
    run_dir: RunDirArg,
    nodes: NodesOption = None,
    jobs: JobsOption = 1,
    wait: WaitOption = True,
    detach: DetachOption = False,
    debug: DebugOption = False,
) -> None:
    """Continue a run with its own spec: failed, killed and stale nodes re-run from their last checkpoint.

    A node still stopping after its scheduler was killed is waited for (at most 120 s) first. Signals and
    --detach as for `trinity run`."""
    from trinity.execute.commands import resume_run
    from trinity.execute.scheduler import SchedulerStopped

    try:
        code = resume_run(run_dir, out, nodes, jobs, wait, detach)
    except SchedulerStopped as stopped:
        err.print(f"[yellow]interrupted[/] ({stopped.signal_name}): {shown(stopped.message)}", highlight=False)
        raise typer.Exit(stopped.exit_code) from None
    raise typer.Exit(code)


@app.command()
@handles_errors
def cancel(
    run_dir: RunDirArg,
    node: Annotated[str | None, typer.Argument(help="A node id or glob (default: all).")] = None,
    debug: DebugOption = False,
) -> None:
    """Stop a run's running nodes (or one node's) at a committed checkpoint; dependants become DEP_FAILED.

    A Slurm run: its jobs are cancelled (scancel). A local run: each running node gets SIGTERM, commits a
    checkpoint and exits (its attempt ends STOPPED); one not stopped within 120 s is killed (KILLED).
    `trinity resume` continues from the checkpoint."""
    from trinity.execute.commands import cancel_run

    for line in cancel_run(run_dir, node):
        out.print(shown(line), highlight=False, soft_wrap=True, emoji=False)


@app.command()
@handles_errors
def logs(
    run_dir: RunDirArg,
    node: Annotated[str, typer.Argument(help="Node id.")],
    attempt: Annotated[
        int | None, typer.Option("--attempt", min=1, help="Attempt number (default: the latest).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing what is appended until the attempt ends.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Print a node attempt's log: its stdout and stderr (every rank's, prefixed `[rank r]` when several), from
    nodes/<id>/logs/attempt-NNNN.log. --follow prints on while the attempt runs; Ctrl-C stops following only."""
    from trinity.execute.logs import attempt_log, show

    log = attempt_log(run_dir, node, attempt)

    def write(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()

    try:
        show(log, write, follow)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
@handles_errors
def status(
    run_dir: RunDirArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    debug: DebugOption = False,
) -> None:
    """Show every node's state, attempts and progress. A RUNNING node whose process is dead (by its heartbeat
    lease, the rule `resume` uses) is shown as `RUNNING (dead: why)`; --json has `live` and `why`."""
    from trinity.execute.commands import status_report

    report = status_report(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    from trinity.cli_render import print_status

    print_status(out, report)
    dead = [n["id"] for n in report["nodes"] if n["live"] is False]
    if dead:
        line = f"dead: {', '.join(dead)}; continue with `trinity resume {report['root']}`"
        out.print(f"[red]{shown(line)}[/]", highlight=False, soft_wrap=True, emoji=False)


@app.command()
@handles_errors
def watch(
    run_dir: RunDirArg,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (scripts, tests).")] = False,
    debug: DebugOption = False,
) -> None:
    """Live view of a run: each running node's step, tokens/s, ETA, loss sparkline, grad norm, MaxVio, last
    events and stalls. Exits when the run has ended: 0, or 1 if a node failed; Ctrl-C stops watching only."""
    from trinity.cli_watch import watch as watch_run

    raise typer.Exit(watch_run(run_dir, out, interval, once))


@app.command()
@handles_errors
def explain(
    run_dir: RunDirArg,
    node: Annotated[str, typer.Argument(help="Node id.")],
    graph: Annotated[
        Path | None,
        typer.Option(
            "--graph",
            help="Judge against this graph file (and --set), as `trinity run GRAPH --run-dir RUN_DIR` would; "
            "default: the run's stored spec, as `trinity resume` would.",
        ),
    ] = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Say why a node will run or be reused on `trinity resume` (or on a run of --graph), and which code its
    attempts ran (provenance)."""
    from trinity.execute.commands import explain as explain_node
    from trinity.execute.provenance import explain_lines
    from trinity.run.layout import RunDir
    from trinity.run.status import list_attempts

    if set_ and graph is None:
        raise SpecError(["--set needs --graph (a resume uses the run's stored spec)"])
    decision = explain_node(run_dir, node, graph, set_ or [])
    verb = {"reuse": "will be reused", "run": "will run", "busy": "is busy", "stopping": "is stopping"}[decision.action]
    on = "" if graph is None else f" by `trinity run {graph} --run-dir {run_dir}`"
    out.print(f"{shown(node)} {verb}{on}: {shown(decision.reason)}", highlight=False, soft_wrap=True, emoji=False)
    for line in explain_lines(node, list_attempts(RunDir(run_dir.resolve()).node(node))):
        out.print(shown(line), highlight=False, soft_wrap=True, emoji=False)


@app.command()
@handles_errors
def sql(
    path: Annotated[Path, typer.Argument(help="A run directory, or a folder of runs (e.g. runs/).")],
    query: Annotated[
        str | None, typer.Argument(help="One read-only SQL statement (tables: steps, moe_layers, ...).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, csv or json.")] = "table",
    duckdb_file: Annotated[
        Path | None,
        typer.Option(
            "--duckdb",
            help="Write the catalog's tables and views to this DuckDB file (replaced if it exists) for the "
            "DuckDB CLI, Python or BI tools; a snapshot: export again to see newer parts.",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0, help="Stop the query after SECONDS (default: 300; 0: no limit)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="A damaged telemetry part is an error (default: skipped with a warning).")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Read-only SQL over the telemetry of one run or of every run under a folder (docs/telemetry.md).

    A telemetry part that cannot be read is left out with a warning naming it (`trinity verify` checks them all).
    `--duckdb OUT.duckdb` writes the same tables and views to a database file (with a QUERY: then runs it).
    """
    from trinity.store.sql import DEFAULT_TIMEOUT_S, run_sql

    if fmt not in ("table", "csv", "json"):
        raise SpecError([f"--format {fmt!r}: allowed: table, csv, json"])
    if query is None and duckdb_file is None:
        raise SpecError(["trinity sql: give a QUERY, or --duckdb OUT.duckdb to write the catalog to a file"])
    if duckdb_file is not None:
        from trinity.store.duckdb_file import write_duckdb

        names = write_duckdb(path, duckdb_file, strict=strict)
        err.print(f"wrote {shown(str(duckdb_file))}: {', '.join(names)}", highlight=False, soft_wrap=True)
    if query is not None:
        limit = DEFAULT_TIMEOUT_S if timeout is None else timeout
        sys.stdout.write(run_sql(path, query, fmt, timeout_s=limit, strict=strict))  # type: ignore[arg-type]


@app.command()
@handles_errors
def verify(
    run_dir: RunDirArg,
    node: Annotated[str | None, typer.Argument(help="Only this node (e.g. pretrain/phase1).")] = None,
    debug: DebugOption = False,
) -> None:
    """Check every committed checkpoint (checksums, every chunk present) and telemetry part (readable,
    no gaps) of a run or of one node. One line per problem, naming the file; exit 2 if anything is damaged."""
    from trinity.store.verify import verify_run

    report = verify_run(run_dir, node)
    for note in report.notes:
        err.print(f"note: {shown(note)}", highlight=False, soft_wrap=True, emoji=False)
    for problem in report.problems:
        out.print(f"damaged: {shown(problem)}", highlight=False, soft_wrap=True, emoji=False)
    what = f"{report.checkpoints} committed checkpoints and {report.parts} telemetry parts"
    if not report.ok:
        n = len(report.problems)
        err.print(f"[bold red]error[/]: {n} problem{'s' if n != 1 else ''} in {what}", highlight=False, emoji=False)
        raise typer.Exit(2)
    out.print(f"ok: {what} intact", highlight=False)


@app.command()
@handles_errors
def compact(
    run_dir: RunDirArg,
    node: Annotated[str | None, typer.Argument(help="Only this node (e.g. pretrain/phase1).")] = None,
    debug: DebugOption = False,
) -> None:
    """Merge the telemetry parts of every finished attempt into one part per table (queries see the same rows,
    faster). Running attempts are left alone. Prints parts, rows and bytes before -> after."""
    from trinity.cli_render import human_bytes
    from trinity.store.compaction import compact_run

    def line(what: object, parts: tuple[int, int], rows: int, size: tuple[int, int]) -> str:
        before, after = human_bytes(size[0]), human_bytes(size[1])
        return f"{what}: {parts[0]} -> {parts[1]} parts, {rows} rows, {before} -> {after}"

    report = compact_run(
        run_dir,
        node,
        on_attempt=lambda a: out.print(
            shown(line(a.folder, (a.parts_before, a.parts_after), a.rows, (a.bytes_before, a.bytes_after))),
            highlight=False,
            soft_wrap=True,
            emoji=False,
        ),
    )
    for note in report.skipped:
        err.print(f"note: {shown(note)}: left as it is", highlight=False, soft_wrap=True, emoji=False)
    for problem in report.problems:
        err.print(f"[yellow]warning[/]: {shown(problem)}", highlight=False, soft_wrap=True, emoji=False)
    n = len(report.attempts)
    total = line(
        f"compacted {n} attempt{'s' if n != 1 else ''}",
        (report.parts_before, report.parts_after),
        report.rows,
        (report.bytes_before, report.bytes_after),
    )
    out.print(shown(total) if n else "nothing to compact", highlight=False, soft_wrap=True, emoji=False)


@app.command()
@handles_errors
def plot(
    run_dir: RunDirArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the PNGs (default: RUN/plots).")] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Runs under RUN (a folder of runs) to draw on one axis: a glob over their paths ('lr-*'), "
            "or SQL returning run_id (and optionally node).",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Write PNGs: loss against tokens and MaxVio against step (a panel per stage kind, a line per branch,
    seeds as mean and min-max band), MaxVio and expert-load heatmaps per node; no telemetry is an error.

    With --compare: compare-loss.png and compare-max_vio.png, a line per (run, training node) labelled
    `RUN: NODE`, for the runs under RUN that the glob or SQL chooses."""
    from trinity.store.plots import plot_compare, plot_run

    paths = plot_run(run_dir, out_dir) if compare is None else plot_compare(run_dir, compare, out_dir)
    for path in paths:
        out.print(shown(path), highlight=False, emoji=False)


@app.command()
@handles_errors
def generate(
    run_dir: RunDirArg,
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    node: Annotated[str, typer.Option("--node", help="A finished training node (e.g. sft, pretrain/phase3).")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: DebugOption = False,
) -> None:
    """Continue a prompt with a finished training node's final checkpoint (KV-cached decoding)."""
    from trinity.nodes.generate_cmd import generate_cli

    if not node:
        raise SpecError(["--node is required: the training node whose final checkpoint generates"])
    out.print(
        generate_cli(run_dir, node, prompt, max_new_tokens, temperature, top_p, seed), highlight=False, markup=False
    )


@app.command()
@handles_errors
def export(
    run_dir: RunDirArg,
    node: Annotated[str, typer.Argument(help="A training node of the run (e.g. sft, pretrain/phase3).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (absent or empty).")],
    step: Annotated[
        int | None, typer.Option("--step", help="A committed step (default: the final checkpoint, else the newest).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 (lossless) or bfloat16.")] = "float32",
    debug: DebugOption = False,
) -> None:
    """Export a training node's checkpoint as a transformers AfmoeForCausalLM directory (checked: logits round trip)."""
    from trinity.nodes.export import export_cli

    if dtype not in ("float32", "bfloat16"):
        raise SpecError([f"--dtype {dtype!r} is not float32 or bfloat16"])
    result = export_cli(run_dir, node, out_dir, step, "bfloat16" if dtype == "bfloat16" else "float32")
    check = result["check"]
    out.print(
        f"exported {shown(node)} step {result['step']} to {shown(out_dir)}: {result['shards']} shard(s), "
        f"{result['bytes'] / 1e6:.1f} MB {dtype}; transformers' logits within {check['max_abs_diff']:.2g} "
        f"of trinity's on {check['sequences']} sequences",
        highlight=False,
        emoji=False,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
