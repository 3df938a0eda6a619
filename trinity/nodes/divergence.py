"""What a diverged training node (a loss or gradient norm that is not finite) tells the user to do.

`trinity resume` continues a node with the spec stored in its run directory, so it repeats the same
steps on the same data and diverges the same way: it is not the way out. What works is a lower
learning rate in the graph: `trinity run GRAPH --set FIELD=VALUE` (or the edited file) gives the
node, and the nodes after it, a new identity; it then trains from its beginning while the nodes
before it are reused. The fields named are the ones that set this node's learning rate and re-run
the fewest nodes: the stage's own lr for extension, SFT and RL, the pretraining peaks otherwise
(which re-run every pretraining phase). The values suggested are half of the current ones.
"""

from __future__ import annotations

from pathlib import Path

from trinity.spec.experiment import ExperimentSpec
from trinity.spec.stages import RewarmLR


class NonFiniteLoss(ValueError):
    """A step's loss is not finite (raised below the node, which adds its step and `divergence_advice`)."""


def lr_fields(spec: ExperimentSpec, kind: str) -> dict[str, float]:
    """Dotted field path -> its current value, for the fields that set the lr of a node of `kind`."""
    stages = spec.stages
    if kind == "extend" and stages.extend is not None:
        lr = stages.extend.lr
        if isinstance(lr, RewarmLR):
            return {"stages.extend.lr.peak_fraction": lr.peak_fraction}
        return {"stages.extend.lr.from_fraction": lr.from_fraction, "stages.extend.lr.to_fraction": lr.to_fraction}
    if kind == "sft" and stages.sft is not None:
        return {"stages.sft.peak_fraction": stages.sft.peak_fraction}
    if kind == "rl" and stages.rl is not None:
        return {"stages.rl.lr": stages.rl.lr}
    return {"optim.muon.lr": spec.optim.muon.lr, "optim.adamw.lr": spec.optim.adamw.lr}


def relaunch_sets(spec: ExperimentSpec, kind: str) -> list[str]:
    """The `--set FIELD=VALUE` overrides (each lr field halved) that re-run a diverged node of `kind`."""
    return [f"{path}={value / 2:.6g}" for path, value in lr_fields(spec, kind).items()]


def divergence_advice(spec: ExperimentSpec, kind: str, run_root: Path) -> str:
    """The sentences that end a divergence failure: what to change, the command, and why not resume."""
    sets = " ".join(f"--set {s}" for s in relaunch_sets(spec, kind))
    clip = "" if kind == "rl" else " (or tighten stability.grad_clip)"
    return (
        f"Lower the learning rate{clip} in the graph file and run it again, e.g. "
        f"`trinity run GRAPH --run-dir {run_root} {sets}`: this node and the ones after it re-run from their "
        "start, the nodes before it are reused. `trinity resume` would not help: it reuses the stored spec "
        "and repeats the same steps."
    )
