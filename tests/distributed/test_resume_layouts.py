"""A checkpoint written by 4 ranks (HSDP 2 x 2, expert-parallel 2) resumes on 2 ranks and on 1 rank.

The 4-rank job trains 3 steps and commits a checkpoint (every rank writes its shards into one Zarr
store); jobs of other layouts resume from it through the nodes' own resume path (resharding load
into their layout, loader position, RNG) and take the next step. The reference is the 4-rank job
itself continuing: the next-step loss must be the same on every layout.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.distributed.test_training_parity import BATCH, MICRO, SEQ, SyntheticBatches, _spec, synthetic_source
from trinity.distributed.testing import run_workers
from trinity.nodes.trainer import Trainer, TrainPlan, build_training, resume_into
from trinity.optim.balancing import update_expert_biases
from trinity.run.layout import NodeDir
from trinity.run.status import AttemptRecord
from trinity.spec.execution import CheckpointSpec, ExecutionSpec
from trinity.store.checkpoint import load_checkpoint
from trinity.store.checkpoint_commit import list_checkpoints, read_marker

pytestmark = pytest.mark.slow  # multi-rank: gloo processes

IDENTITY = "test-identity"


def _context(world: int, fsdp_group: int, ep: int, node_root: str) -> Any:
    spec = _spec(world, fsdp_group, ep)
    spec.execution = ExecutionSpec(checkpoint=CheckpointSpec(keep_last=2))
    return SimpleNamespace(
        spec=spec,
        dir=NodeDir(Path(node_root)),
        node=SimpleNamespace(identity=IDENTITY),
        graph=SimpleNamespace(nodes={}),  # no node starts from this one (referenced_steps)
        attempt=1,
        node_id="pretrain/p",
    )


def _trainer(ctx: Any, training: Any, first_step: int) -> Trainer:
    plan = TrainPlan("p", first_step, 10, 0, SEQ, MICRO, lambda tokens: BATCH, lambda step, tokens: 1.0)
    return Trainer(ctx, training.model, training.optimizer, training.batches, plan, None, sharding=training.sharding)


def _step(trainer: Trainer) -> float:
    r = trainer.train_step()
    update_expert_biases(trainer.model, r.counts_LE, trainer.stability.balancing)
    trainer.step += 1
    return r.loss


def _train_save_continue(rank: int, world: int, fsdp_group: int, ep: int, node_root: str) -> list[float]:
    """3 steps, a checkpoint at step 3, then 1 more step: [loss 1..4]."""
    ctx = _context(world, fsdp_group, ep, node_root)
    training = build_training(ctx, synthetic_source())
    trainer = _trainer(ctx, training, 0)
    losses = [_step(trainer) for _ in range(3)]
    trainer.checkpoint()
    losses.append(_step(trainer))
    return losses


def _resume_and_step(rank: int, world: int, fsdp_group: int, ep: int, node_root: str) -> tuple[int, float]:
    ctx = _context(world, fsdp_group, ep, node_root)
    training = build_training(ctx, synthetic_source())
    resumed = resume_into(ctx, training)
    assert resumed is not None
    trainer = _trainer(ctx, training, resumed[0])
    return resumed[0], _step(trainer)


@pytest.fixture(scope="module")
def four_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    root = tmp_path_factory.mktemp("node")
    AttemptRecord(attempt=1, executor="test", identity=IDENTITY).write(NodeDir(root))
    losses = run_workers(_train_save_continue, 4, 2, 2, str(root), timeout_s=300)[0]
    return root, losses


def test_written_by_four_ranks(four_rank_checkpoint: tuple[Path, list[float]]) -> None:
    root, _ = four_rank_checkpoint
    ((step, path, committed),) = list_checkpoints(root / "checkpoints")
    assert (step, committed) == (3, True)
    assert read_marker(path)["step"] == 3


@pytest.mark.parametrize(("world", "fsdp_group", "ep"), [(2, 2, 2), (1, 1, 1)])
def test_resumes_on_fewer_ranks_with_the_same_next_loss(
    world: int, fsdp_group: int, ep: int, four_rank_checkpoint: tuple[Path, list[float]]
) -> None:
    root, losses = four_rank_checkpoint
    if world == 1:
        torch.set_num_threads(1)
        step, loss = _resume_and_step(0, 1, 1, 1, str(root))
    else:
        step, loss = run_workers(_resume_and_step, world, fsdp_group, ep, str(root), timeout_s=300)[0]
    assert step == 3
    assert loss == pytest.approx(losses[3], rel=1e-5)
    assert AttemptRecord.read(NodeDir(root), 1).resumed_from_step == 3


def test_exports_to_hugging_face(four_rank_checkpoint: tuple[Path, list[float]], tmp_path: Path) -> None:
    """The 4-rank checkpoint read whole in one process, exported, loaded by transformers: same logits."""
    transformers = pytest.importorskip("transformers")
    from trinity.interop.hf import save_pretrained
    from trinity.model import TrinityModel

    root, _ = four_rank_checkpoint
    (_, path, _), *_ = list_checkpoints(root / "checkpoints")
    model = TrinityModel(_spec(1, 1, 1).model)
    model.load_state_dict(load_checkpoint(path)["model"])
    save_pretrained(model.eval(), tmp_path / "hf")
    theirs = transformers.AfmoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = SyntheticBatches().next_batch().tokens_BT
    with torch.no_grad():
        ours_logits = model(ids).logits
        their_logits = theirs(ids).logits
    assert (ours_logits - their_logits).abs().max().item() < 1e-4
