"""Rich tables for the CLI's human output."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trinity.graph.diff import SpecDiff


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
    nodes = Table(title=title, title_justify="left")
    for col in ("node", "kind", "identity", "depends on", "tokens", "steps", "GPU-hours"):
        nodes.add_column(col, justify="right" if col in ("tokens", "steps", "GPU-hours") else "left")
    for n in plan["nodes"]:
        nodes.add_row(
            escape(n["id"]),
            n["kind"],
            n["identity"][:12],
            escape(", ".join(n["deps"])) or "-",
            human_count(n["tokens"]) if "tokens" in n else "",
            f"{n['steps']:,}" if "steps" in n else "",
            f"{n['gpu_hours']:,.1f}" if "gpu_hours" in n else "",
        )
    console.print(nodes)
    summary = Table(title="estimates", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    mem = est["memory_breakdown"]
    rows = [
        ("total parameters", human_count(est["total_params"])),
        ("active parameters / token", human_count(est["active_params"])),
        ("active, without embedding and head", human_count(est["active_params_non_embedding"])),
        ("training FLOPs / token (pretraining length)", f"{est['flops_per_token']:.3e}"),
        ("world size", f"{est['world_size']:,}"),
        (
            "memory / GPU (peak stage)",
            human_bytes(est["memory_per_gpu_bytes"]) + ("" if est["memory_fits"] else "  [bold red]does not fit[/]"),
        ),
        ("  of which", ", ".join(f"{k} {human_bytes(v)}" for k, v in mem.items())),
        ("checkpoint size", human_bytes(est["checkpoint_bytes"])),
        ("GPU-hours (whole graph)", f"{est['graph_gpu_hours']:,.0f}"),
    ]
    for row in rows:
        summary.add_row(*row)
    console.print(summary)


def print_diff(console: Console, result: SpecDiff) -> None:
    table = Table(title="changed fields", title_justify="left")
    for col in ("field", "before", "after", "identity"):
        table.add_column(col)
    for c in result.changes:
        table.add_row(
            escape(c.path),
            escape(repr(c.before)),
            escape(repr(c.after)),
            "no (execution)" if c.execution_only else "yes",
        )
    console.print(table)
    console.print(f"[bold]re-run[/] ({len(result.rerun)}): {escape(', '.join(result.rerun)) or 'nothing'}")
    console.print(f"[bold]reused[/] ({len(result.reused)}): {escape(', '.join(result.reused)) or 'nothing'}")
    if result.removed:
        console.print(f"[bold]removed[/] ({len(result.removed)}): {escape(', '.join(result.removed))}")


def print_status(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"{report['run'].get('name', '')}  {report['root']}", title_justify="left")
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
        p = n["progress"]
        progress = f"step {p['step']}/{p['total_steps']}, loss {p['loss']}" if "step" in p else ""
        table.add_row(escape(n["id"]), n["state"], str(len(attempts)), how, progress, escape(n["message"]))
    console.print(table)


def print_jobs(console: Console, rows: list[dict[str, Any]]) -> None:
    """The sbatch parameters of each node (trinity run --dry-run)."""
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
        table.add_row(*(escape(str(row.get(c, "") or "")) for c in columns))
    console.print(table)
