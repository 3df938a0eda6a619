"""The device helpers the nodes use (trinity.distributed.device) and the trainer's per-step device telemetry.

The GPU paths (pinned non-blocking copies, CUDA peak memory) run in bench/gpu_check.py on a GPU;
here: batches of any shape reach the target device, autocast follows the precision, the CPU's
peak memory is per step, and the trainer's MFU in a real telemetry part equals the closed form.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pytest
import torch

from trinity.data.packing import Batch
from trinity.distributed.device import autocast, module_device, peak_memory, reset_peak_memory, to_device
from trinity.model import TrinityModel
from trinity.nodes.trainer import Trainer, TrainPlan
from trinity.optim.groups import build_optimizer
from trinity.run.layout import NodeDir
from trinity.spec.execution import ExecutionSpec
from trinity.spec.model import ModelSpec
from trinity.spec.optim import OptimSpec
from trinity.spec.parallel import AcceleratorSpec, ParallelSpec
from trinity.spec.stability import StabilitySpec
from trinity.store.telemetry import TelemetryWriter

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
META = torch.device("meta")


@dataclasses.dataclass(frozen=True)
class _Rollout:
    ids_BT: torch.Tensor
    note: str


def test_to_device_moves_every_tensor_and_keeps_the_rest() -> None:
    batch = Batch(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8))
    nested = {"batch": batch, "pair": (torch.ones(3), 7), "rows": [_Rollout(torch.ones(1, 4), "x")]}
    moved: dict[str, Any] = to_device(nested, META)
    assert [moved["batch"].tokens_BT.device, moved["batch"].targets_BT.device, moved["batch"].doc_ids_BT.device] == [
        META
    ] * 3
    assert moved["batch"].targets_BT.dtype == torch.long and moved["batch"].tokens_BT.shape == (2, 8)
    assert moved["pair"][0].device == META and moved["pair"][1] == 7 and isinstance(moved["pair"], tuple)
    assert moved["rows"][0].ids_BT.device == META and moved["rows"][0].note == "x"
    assert batch.tokens_BT.device == CPU, "the input batch is left as it was"
    same = to_device(batch, CPU)  # already there: the very same tensors, no copy
    assert same.tokens_BT is batch.tokens_BT and same.doc_ids_BT is batch.doc_ids_BT


def test_autocast_follows_the_precision_on_the_device_type() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert (a @ b).dtype == torch.float32
    assert module_device(torch.nn.Linear(2, 2)) == CPU


def test_cpu_peak_memory_is_per_step() -> None:
    """The peak RSS counts a buffer touched in the step, and a reset forgets a freed one."""
    size = 256 << 20
    reset_peak_memory(CPU)
    before = peak_memory(CPU)
    x = torch.ones(size // 4)  # touched: resident
    during = peak_memory(CPU)
    del x
    reset_peak_memory(CPU)
    after = peak_memory(CPU)
    assert before.reserved is None and during.reserved is None  # the CPU reports no reserved figure
    assert during.allocated - before.allocated >= 0.9 * size
    assert after.allocated <= during.allocated - 0.5 * size


SEQ, MICRO, BATCH, VOCAB = 32, 2, 4, 128
PEAK_TFLOPS = 1e-3
SECONDS = 0.25


class _Batches:
    def __init__(self) -> None:
        self.i = 0

    def next_batch(self) -> Batch:
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        return Batch(tokens[:, :-1], tokens[:, 1:], torch.zeros(MICRO, SEQ, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


def test_trainer_logs_mfu_and_peak_memory(tmp_path: Path) -> None:
    """MFU in the telemetry part equals achieved FLOP/s over the declared peak, with the FLOPs of a
    token counted by hand from the model's own matrices: 6 x (every matrix but the embedding) plus
    attention's 12 x heads x head_dim x mean causal context (T + 1) / 2 per layer."""
    model_spec = ModelSpec.model_validate(
        dict(
            vocab_size=VOCAB,
            d_model=32,
            n_layers=2,
            n_dense_layers=2,  # dense: every matrix is active for every token
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            dense_hidden=64,
            global_every=1,
            sliding_window=SEQ,
        )
    )
    spec = SimpleNamespace(
        seed=0,
        model=model_spec,
        parallel=ParallelSpec(micro_batch=MICRO, accelerator=AcceleratorSpec(peak_bf16_tflops=PEAK_TFLOPS)),
        stability=StabilitySpec(precision="bf16"),
        optim=OptimSpec(),
        execution=ExecutionSpec(),
    )
    torch.manual_seed(0)
    model = TrinityModel(model_spec)
    plan = TrainPlan("p", 0, 2, 0, SEQ, MICRO, lambda tokens: BATCH, lambda step, tokens: 1.0)
    node = NodeDir(tmp_path / "node")
    with TelemetryWriter(node, "pretrain/p", 1, "r", tensorboard=False) as w:
        trainer = Trainer(SimpleNamespace(spec=spec), model, build_optimizer(model, spec.optim), _Batches(), plan, w)  # type: ignore[arg-type]
        for step in (1, 2):
            result = trainer.optimizer_step()
            trainer.step = step
            trainer.log_step(result, SECONDS)
    rows = duckdb.execute(
        f"SELECT step, tokens_per_s, mfu, peak_mem_allocated_bytes, peak_mem_reserved_bytes "
        f"FROM read_parquet('{node.telemetry(1)}/steps-*.parquet') ORDER BY step"
    ).fetchall()

    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    assert matrices == sum(p.numel() for p in model.parameters() if p.dim() == 2) - VOCAB * model_spec.d_model
    attention = 12 * model_spec.n_heads * model_spec.head_dim * (SEQ + 1) / 2 * model_spec.n_layers
    flops_per_token = 6 * matrices + attention
    tokens_per_s = BATCH * SEQ / SECONDS
    expected_mfu = tokens_per_s * flops_per_token / (PEAK_TFLOPS * 1e12)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert [r[0] for r in rows] == [1, 2]
    for _, tps, mfu, allocated, reserved in rows:
        assert tps == pytest.approx(tokens_per_s)
        assert mfu == pytest.approx(expected_mfu, rel=1e-12)
        assert allocated > param_bytes and reserved is None  # CPU: the process's peak RSS, no reserved figure


def _gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_check_skips_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert _gpu_check().main([]) == 0
    assert "skipped" in json.loads(capsys.readouterr().out)


@pytest.mark.slow  # ~20 s on a quiet 2-core machine: trains twice, builds trinity and transformers models
def test_gpu_check_runs_its_cpu_paths(tmp_path: Path) -> None:
    """bench/gpu_check.py --device cpu --small: the CPU run repeats itself exactly (the parity
    reference is deterministic), and trinity and AfmoeForCausalLM built from the same weights give
    the same loss, so the throughput comparison compares like with like."""
    out = tmp_path / "check.json"
    args = ["--device", "cpu", "--small", "--steps", "2", "--iters", "1", "--out", str(out)]
    assert _gpu_check().main(args) == 0
    r = json.loads(out.read_text())
    parity = r["parity"]
    assert parity["ok"] and parity["max_rel_diff"] == 0.0 and len(parity["device"]["losses"]) == 2
    t = r["throughput"]
    assert t["trinity"]["loss"] == pytest.approx(t["afmoe"]["loss"], rel=1e-2)
    for name in ("trinity", "afmoe"):
        assert t[name]["tokens_per_s"] > 0 and 0 < t[name]["mfu"] < 1 and t[name]["peak_allocated_bytes"] > 0
    assert t["ratios"]["tokens_per_s_trinity_over_afmoe"] > 0
