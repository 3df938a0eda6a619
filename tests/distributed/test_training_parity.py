"""The distributed trainer against the single-process one: same global batch, same parameters and losses.

Each layout runs the real code path (build_training: init as one process, mesh, expert parallelism,
FSDP2 per block; Trainer.train_step: micro-batch slices, FSDP gradient averaging, global grad
norm, Muon orthogonalising whole matrices, summed expert counts and the bias update) on gloo
ranks; the reference is the same code with no process group.

Muon's Newton-Schulz runs in fp32 here (optim.muon.ns_dtype): in bf16 (torch.optim.Muon's choice,
the default) gradients that agree to ~1e-9 can still round to different bf16 values, and the
iteration spreads one flip over the whole matrix (an lr x 2^-6 difference per step), which says
nothing about the layout.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from trinity.data.packing import Batch
from trinity.distributed.data import StreamSet
from trinity.distributed.testing import run_workers
from trinity.nodes.trainer import Trainer, TrainPlan, build_training
from trinity.optim.balancing import update_expert_biases
from trinity.spec.execution import ExecutionSpec
from trinity.spec.model import ModelSpec
from trinity.spec.optim import OptimSpec
from trinity.spec.parallel import ParallelSpec
from trinity.spec.stability import StabilitySpec

pytestmark = pytest.mark.slow  # multi-rank: gloo processes

SEQ, MICRO, BATCH = 64, 2, 8  # 8 sequences a step = 4 micro-batches of 2
MUON_LR = 0.02

MODEL = dict(
    vocab_size=256,
    d_model=64,
    n_layers=4,
    n_dense_layers=1,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    dense_hidden=128,
    global_every=4,
    sliding_window=16,
    moe=dict(n_experts=4, n_shared_experts=1, top_k=2, expert_hidden=32, route_scale=2.0),
)


class SyntheticBatches:
    """A deterministic, learnable stream (each document follows x' = 5x + 3 mod V from a random start)
    of micro-batches with document ids (so intra-document masking is exercised). Stream `stream` of
    `n_streams` yields micro-batches stream, stream + n_streams, ... of the one global sequence."""

    def __init__(self, stream: int = 0, n_streams: int = 1) -> None:
        self.index, self.n_streams = stream, n_streams

    def next_batch(self) -> Batch:
        g = torch.Generator().manual_seed(1000 + self.index)
        self.index += self.n_streams
        vocab: int = MODEL["vocab_size"]  # type: ignore[assignment]
        starts = torch.rand(MICRO, SEQ + 1, generator=g) < 0.05
        tokens = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=g)
        for t in range(1, SEQ + 1):
            tokens[:, t] = torch.where(starts[:, t], tokens[:, t], (5 * tokens[:, t - 1] + 3) % vocab)
        doc_ids = torch.cumsum(starts[:, 1:].long(), dim=1)
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), doc_ids)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


STREAMS = 4
"""Data streams of every layout here (each rank reads its own; the global sequence is the same)."""


def synthetic_source() -> StreamSet:
    """This rank's streams of the synthetic data (the job's rank and world)."""
    return StreamSet(lambda s: SyntheticBatches(s, STREAMS), STREAMS)


def _spec(world: int, fsdp_group: int, ep: int) -> Any:
    return SimpleNamespace(
        seed=0,
        model=ModelSpec.model_validate(MODEL),
        parallel=ParallelSpec(
            nodes=1, gpus_per_node=world, fsdp_group=fsdp_group, ep=ep, micro_batch=MICRO, param_dtype="fp32"
        ),
        stability=StabilitySpec.model_validate(
            {
                "balancing": {"kind": "smebu"},
                "aux_loss_weight": 1e-3,
                "z_loss_weight": 1e-4,
                "grad_clip": 1.0,
                "intra_document_masking": True,
            }
        ),
        optim=OptimSpec.model_validate({"muon": {"lr": MUON_LR, "ns_dtype": "fp32"}, "adamw": {"lr": 3e-3}}),
        execution=ExecutionSpec(),
    )


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered whole (DTensors) or as is."""
    out = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name] = full.detach().clone()
    return out


def _train(rank: int, world: int, fsdp_group: int, ep: int, steps: int) -> dict[str, Any]:
    spec = _spec(world, fsdp_group, ep)
    ctx = SimpleNamespace(spec=spec)
    training = build_training(ctx, synthetic_source())  # type: ignore[arg-type]
    plan = TrainPlan("p", 0, steps, 0, SEQ, MICRO, lambda tokens: BATCH, lambda step, tokens: 1.0)
    trainer = Trainer(ctx, training.model, training.optimizer, training.batches, plan, None, sharding=training.sharding)  # type: ignore[arg-type]
    losses, het, counts, norms = [], [], [], []
    first: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        r = trainer.train_step()
        update_expert_biases(trainer.model, r.counts_LE, spec.stability.balancing)
        losses.append(r.loss)
        het.append(r.batch_het)
        norms.append(r.grad_norm)
        counts.append(r.counts_LE.clone())
        first = first or _full(training.model)
    return {
        "losses": losses,
        "batch_het": het,
        "counts": counts,
        "grad_norms": norms,
        "first": first,
        "last": _full(training.model),
    }


def _single(steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    return _train(0, 1, 1, 1, steps)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _single(steps=20)


def _assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        diff = (got[k].float() - want[k].float()).abs().max().item()
        assert diff < atol, f"{k}: largest difference {diff:.3g}"


def _assert_first_step(got: dict[str, Any], reference: dict[str, Any]) -> None:
    _assert_same_params(got["first"], reference["first"], atol=2e-5)
    assert got["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-6)
    # The norm, unlike Muon's and Adam's first update, sees the scale of every gradient.
    assert got["grad_norms"][0] == pytest.approx(reference["grad_norms"][0], rel=1e-6)
    assert torch.equal(got["counts"][0], reference["counts"][0])  # counts summed over ranks
    assert got["batch_het"][0] == pytest.approx(reference["batch_het"][0], abs=1e-5)  # over all micro-batches


@pytest.mark.parametrize(
    ("world", "fsdp_group", "ep"),
    [(2, 2, 1), (4, 4, 2)],
    ids=["fsdp2", "fsdp2xep2"],  # fsdp2xep2: experts split over 2 ranks, each half FSDP-sharded over 2
)
def test_one_step_equals_single_process(world: int, fsdp_group: int, ep: int, reference: dict[str, Any]) -> None:
    for got in run_workers(_train, world, fsdp_group, ep, 1):  # every rank gathers the same parameters
        _assert_first_step(got, reference)


def test_twenty_steps_hsdp_2x2_with_expert_parallelism(reference: dict[str, Any]) -> None:
    got = run_workers(_train, 4, 2, 2, 20)[0]
    _assert_first_step(got, reference)
    assert got["losses"] == pytest.approx(reference["losses"], rel=2e-5)
    assert reference["losses"][-1] < reference["losses"][0] - 0.5  # it trains
    _assert_same_params(got["last"], reference["last"], atol=2e-4)
