"""Rich tables for the CLI's human output.

Every value that comes from a spec, a run directory or the command line (names, node ids, paths,
messages, diff values) is printed as plain `rich.text.Text`: rich markup in it (`[red]x`, `[/bold]`)
and emoji codes (`:fire:`) stay as written instead of styling, vanishing or raising MarkupError, and
control characters (an escape sequence that would drive the terminal) are shown as `\\x1b`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # a type only: printing an error must not import the spec models
    from trinity.graph.diff import SpecDiff


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters a terminal acts on or breaks lines at (tab and newline are kept)."""


def printable(text: str, newlines: bool = True) -> str:
    """`text` with control characters written as escapes (`\\x1b`), and newlines too unless `newlines`."""
    pattern = CONTROL if newlines else re.compile(CONTROL.pattern[:-1] + "\n]")
    return pattern.sub(lambda m: ascii(m.group())[1:-1], text)


def plain(value: Any) -> Text:
    """`value` as literal text: no markup, no emoji codes, no control characters."""
    return Text(printable(str(value)))


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def print_plan(console: Console, plan: dict[str, Any]) -> None:
    est = plan["estimates"]
    title = f"{plan['name']}: {len(plan['nodes'])} nodes"
    nodes = Table(title=plain(title), title_justify="left")
    numeric = ("tokens", "steps", "GPU-hours", "days")
    for col in ("node", "kind", "identity", "depends on", *numeric):
        nodes.add_column(col, justify="right" if col in numeric else "left")
    for n in plan["nodes"]:
        nodes.add_row(
            plain(n["id"]),
            plain(n["kind"]),
            plain(n["identity"][:12]),
            plain(", ".join(n["deps"]) or "-"),
            human_count(n["tokens"]) if "tokens" in n else "",
            f"{n['steps']:,}" if "steps" in n else "",
            f"{n['gpu_hours']:,.1f}" if "gpu_hours" in n else "",
            f"{n['days']:,.2f}" if "days" in n else "",
        )
    console.print(nodes)
    for n in plan["nodes"]:  # the shared store (execution.store): what a run takes instead of running
        if "reused_from" in n:
            console.print(plain(f"{n['id']}: reused from {n['reused_from']}"), soft_wrap=True)
        elif "store_problem" in n:
            console.print(plain(f"{n['id']}: will run; the store's entry {n['store_problem']}"), soft_wrap=True)
    if "schedule" in plan:
        print_schedule(console, plan["schedule"])
    if plan.get("data_streams"):
        print_data_streams(console, plan["data_streams"])
    summary = Table(title="estimates", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    mem = est["memory_breakdown"]
    rows: list[tuple[str, str | Text]] = [
        ("total parameters", human_count(est["total_params"])),
        ("active parameters / token", human_count(est["active_params"])),
        ("active, without embedding and head", human_count(est["active_params_non_embedding"])),
        ("training FLOPs / token (pretraining length)", f"{est['flops_per_token']:.3e}"),
        ("world size", f"{est['world_size']:,}"),
        (
            "memory / GPU (pretraining)",
            Text.assemble(
                human_bytes(est["memory_per_gpu_bytes"]), ("" if est["memory_fits"] else ("  does not fit", "bold red"))
            ),
        ),
        ("  of which", plain(", ".join(f"{k} {human_bytes(v)}" for k, v in mem.items()))),
        (
            "  per stage",
            plain(", ".join(f"{k} {human_bytes(v)}" for k, v in est.get("memory_per_stage_bytes", {}).items())),
        ),
        ("checkpoint size", human_bytes(est["checkpoint_bytes"])),
        ("GPU-hours (whole graph)", f"{est['graph_gpu_hours']:,.0f}"),
    ]
    if "graph_days" in est:
        gpus = f"{est['world_size']:,} GPUs"
        rows.append(("days of wall time (whole graph)", f"{est['graph_days']:,.1f} on {gpus}"))
        rows.append(("GPU-hours (pretraining)", f"{est['pretrain_gpu_hours']:,.0f}"))
        rows.append(("days of wall time (pretraining)", f"{est['pretrain_days']:,.1f} on {gpus}"))
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
    if "trace" in plan:
        print_trace(console, plan["trace"])


def print_schedule(console: Console, schedule: dict[str, Any]) -> None:
    """Per pretraining phase: its steps, loader and lr rule; then the warmup and where the lr decay starts."""
    table = Table(title="pretraining schedule", title_justify="left")
    for col in ("phase", "tokens", "steps", "loader", "lr"):
        table.add_column(col, justify="right" if col in ("tokens", "steps") else "left")
    for p in schedule["phases"]:
        loader = p["loader"]
        parts = [str(loader["kind"])]
        if "buffer_size" in loader:
            parts.append(f"buffer {loader['buffer_size']:,}")
        parts.append(f"{loader['workers']} worker{'s' if loader['workers'] != 1 else ''}")
        lr = p["lr"] if isinstance(p["lr"], str) else ", ".join(f"{k} {v}" for k, v in p["lr"].items())
        last = p["first_step"] + p["steps"] - 1
        table.add_row(
            plain(p["name"]),
            human_count(p["tokens"]),
            f"{p['first_step']:,}-{last:,}",
            plain(", ".join(parts)),
            plain(lr),
        )
    console.print(table)
    step, phase = schedule["decay_start_step"], schedule["decay_start_phase"]
    where = "no step (the decay starts after the last step begins)" if step is None else f"step {step:,} ({phase})"
    lines = [
        f"warmup: {schedule['warmup_steps']:,} steps, linear from 0 to the peak",
        f"decay: {schedule['decay']} to {_fraction_of_peak(schedule['final_fraction'])}, after "
        f"{human_count(schedule['decay_start_tokens'])} of {human_count(schedule['total_tokens'])} tokens "
        f"(the last {schedule['decay_fraction']:.1%}; from {schedule['decay_start_field']}); "
        f"first decayed step: {where}",
    ]
    for line in lines:
        console.print(plain(line), soft_wrap=True)


def _fraction_of_peak(fraction: float) -> str:
    return "0" if fraction == 0 else f"{fraction:g} x peak"


def print_data_streams(console: Console, streams: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Per prepare node and source: tokens taken, tokens earlier phases took, and the passes read (estimated)."""
    table = Table(title="data streams: each phase continues where the previous stopped", title_justify="left")
    for col in ("prepare node", "source", "tokens", "after", "pass", "how known"):
        table.add_column(col, justify="right" if col in ("tokens", "after") else "left")
    for node, sources in streams.items():
        for name, row in sources.items():
            first, last = row["first_pass"], row["last_pass"]
            passes = "?" if first is None else (f"{first}" if first == last else f"{first}-{last}")
            if first is not None and last is not None and last > 1:
                passes += " (repeats)" if first == last else " (wraps)"
            table.add_row(
                plain(node),
                plain(name),
                human_count(row["tokens"]),
                human_count(row["tokens_before"]),
                plain(passes),
                plain(row["note"]),
            )
    console.print(table)


def print_trace(console: Console, trace: dict[str, Any]) -> None:
    """`plan --trace`: per stage, what one rank held in the traced training step (or why there was none)."""
    table = Table(title=f"traced step, per rank of {trace['world_size']:,}", title_justify="left")
    for col in ("stage", "seq_len", "params", "grads", "optimizer", "activation peak", "peak", "traced in"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in trace["stages"]:
        if s["skipped"] is not None:
            table.add_row(plain(s["stage"]), f"{s['seq_len']:,}", Text(printable(f"not traced: {s['skipped']}")))
            continue
        table.add_row(
            plain(s["stage"]),
            f"{s['seq_len']:,}",
            *(human_bytes(s[k]) for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_peak_bytes")),
            human_bytes(s["peak_bytes"]),
            f"{s['seconds']:.0f} s",
        )
    console.print(table)
    for line in trace["assumptions"]:
        console.print(plain(f"assumed: {line}"))


def print_diff(console: Console, result: SpecDiff) -> None:
    table = Table(title="changed fields", title_justify="left")
    for col in ("field", "before", "after", "identity"):
        table.add_column(col)
    for c in result.changes:
        table.add_row(
            plain(c.path),
            plain(repr(c.before)),
            plain(repr(c.after)),
            "yes" if c.identity else "no (execution)" if c.execution_only else "no (in no identity)",
        )
    console.print(table)
    for label, ids in (("re-run", result.rerun), ("reused", result.reused), ("removed", result.removed)):
        if ids or label != "removed":
            console.print(Text.assemble((label, "bold"), f" ({len(ids)}): {printable(', '.join(ids)) or 'nothing'}"))


def print_status(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=plain(f"{report['run'].get('name', '')}  {report['root']}"), title_justify="left")
    for col in ("node", "state", "attempts", "last attempt", "progress", "message"):
        table.add_column(col)
    for n in report["nodes"]:
        attempts = n["attempts"]
        last = attempts[-1] if attempts else None
        how = ""
        if last:
            how = f"#{last['attempt']} {last['executor']} {last['state']}"
            if last.get("signal"):
                how += f" (signal {last['signal']})"
            elif last.get("exit_code") not in (None, 0):
                how += f" (exit {last['exit_code']})"
            if last.get("resumed_from_step") is not None:
                how += f", resumed at step {last['resumed_from_step']}"
            if last.get("reused_from"):
                how += ", reused from the store"
        p = n["progress"]
        progress = f"step {p['step']}/{p['total_steps']}, loss {p['loss']}" if "step" in p else ""
        progress += "".join(f", {p[k]} {k}" for k in ("spikes", "alarms") if p.get(k))  # loss spikes, MoE alarms
        state = n["state"]
        if n.get("live") is False:
            state = f"{state} (dead: {n.get('why', '')})"
        elif n.get("stalled"):
            state = f"{state} (STALLED: {n['stalled']})"
        elif n.get("stopping"):
            state = f"{state} (stopping)"
        row = list(map(plain, (n["id"], state, len(attempts), how, progress, n["message"])))
        if n.get("live") is False or n.get("stalled"):
            row[1].stylize("red")
        table.add_row(*row)
    console.print(table)
    for change in report.get("code_changed", []):  # provenance: a resumed node that ran other code
        console.print(Text(printable(f"code changed: {change['message']}"), style="yellow"), soft_wrap=True)


def print_dry_run(console: Console, executor: str, rows: list[dict[str, Any]]) -> None:
    """`trinity run --dry-run`: whether each node would run or be reused and why; on Slurm, then the sbatch
    parameters of the nodes that would run."""
    table = Table(
        title=f"what `trinity run` would do ({executor} executor; nothing run or written)", title_justify="left"
    )
    for col in ("node", "would"):
        table.add_column(col)
    for row in rows:
        table.add_row(plain(row["node"]), plain(row["why"]))
    console.print(table)
    to_run = [row for row in rows if row["action"] == "run"]
    if executor == "slurm" and to_run:
        print_jobs(console, to_run)


def print_jobs(console: Console, rows: list[dict[str, Any]]) -> None:
    """The sbatch parameters of each node (trinity run --dry-run on Slurm)."""
    columns = [
        "node",
        "nodes",
        "ntasks_per_node",
        "gpus_per_node",
        "cpus_per_task",
        "time",
        "partition",
        "account",
        "qos",
        "mem",
        "signal_delay_s",
        "dependency",
    ]
    table = Table(title="sbatch parameters (nothing submitted)", title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(plain(row.get(c, "") or "") for c in columns))
    console.print(table)
