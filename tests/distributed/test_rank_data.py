"""Per-rank data: each rank builds and packs only its own data streams, and the global batch does not
depend on the layout.

The reference is the definition of the global stream written out with the loaders alone: global
micro-batch M is the next micro-batch of loader M mod S, each loader serving "rank s of S" of a
real token store. Against it: the micro-batches of 1, 2 and 4 ranks (in rank order), the losses
of a 4-rank training job (HSDP 2 x 2, expert-parallel 2, on gloo ranks) against one process, and
a data position saved by 4 ranks resumed on 2, then on 1.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.data.conftest import long_tail_lengths, make_store
from tests.distributed.test_training_parity import BATCH, MICRO, SEQ, _spec
from trinity.data.chat import SftBatches
from trinity.data.loaders import build_loader
from trinity.data.packing import Batch, PackedLoader
from trinity.data.store import open_store
from trinity.distributed.data import StreamSet
from trinity.distributed.testing import run_workers
from trinity.errors import LayoutError, SpecError
from trinity.nodes.trainer import Trainer, TrainPlan, build_training
from trinity.optim.balancing import update_expert_biases
from trinity.spec import data as data_spec
from trinity.spec.loading import load_experiment

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 4
LOADER = data_spec.RsdbLoader(buffer_size=8, workers=2)
SEED = 7


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("rank-data") / "store"
    make_store(path, long_tail_lengths(400), vocab=256)
    return str(path)


def _loader(store: Any, s: int, n_streams: int = STREAMS) -> PackedLoader:
    return build_loader(LOADER, store, SEQ, MICRO, rank=s, world=n_streams, seed=SEED)


def _global_stream(store_path: str, n: int) -> list[torch.Tensor]:
    """Micro-batch M of the job = the next one of loader M mod S (the definition, without StreamSet)."""
    store = open_store(store_path)
    loaders = [_loader(store, s) for s in range(STREAMS)]
    return [loaders[m % STREAMS].next_batch().tokens_BT for m in range(n)]


class Counted:
    """A stream that records which stream each packed micro-batch came from."""

    def __init__(self, inner: PackedLoader, s: int, packed: list[int]) -> None:
        self.inner, self.s, self.packed = inner, s, packed

    def next_batch(self) -> Batch:
        self.packed.append(self.s)
        return self.inner.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _stream_set(store_path: str, rank: int | None = None, world: int | None = None) -> StreamSet:
    store = open_store(store_path)
    return StreamSet(lambda s: _loader(store, s), STREAMS, rank, world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_pack_only_their_streams_and_together_read_the_global_stream(store_path: str, world: int) -> None:
    store = open_store(store_path)
    built: list[list[int]] = [[] for _ in range(world)]
    packed: list[list[int]] = [[] for _ in range(world)]

    def make(rank: int) -> Any:
        def stream(s: int) -> Counted:
            built[rank].append(s)
            return Counted(_loader(store, s), s, packed[rank])

        return stream

    ranks = [StreamSet(make(r), STREAMS, r, world) for r in range(world)]
    steps = 12 // world
    got = [ranks[r].next_batch().tokens_BT for _ in range(steps) for r in range(world)]  # M = k W + r
    want = _global_stream(store_path, 12)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for r in range(world):
        assert built[r] == list(range(r, STREAMS, world))  # only its own streams are ever built
        assert len(packed[r]) == steps and set(packed[r]) == set(built[r])  # and packs nothing else


def test_streams_not_divisible_by_the_ranks_are_refused(store_path: str) -> None:
    with pytest.raises(LayoutError, match=r"data.streams = 4 must be a multiple of the data-parallel ranks \(3"):
        _stream_set(store_path, 0, 3)
    with pytest.raises(SpecError, match=r"data.streams.*= 6 must be a multiple of the data-parallel ranks.*= 4\)"):
        load_experiment(ROOT / "graphs" / "tiny-distributed.yaml", ["data.streams=6"])


def test_a_position_of_another_stream_count_is_refused(store_path: str) -> None:
    state = _stream_set(store_path).state_dict()
    store = open_store(store_path)
    other = StreamSet(lambda s: _loader(store, s, 2 * STREAMS), 2 * STREAMS)
    with pytest.raises(ValueError, match=r"drawn from 4 streams but data.streams = 8: resume with data.streams = 4"):
        other.load_state_dict(state)


def test_sft_streams_share_out_each_epoch_of_conversations() -> None:
    """Stream s of S packs conversations s, s + S, ... of the one-stream epoch order: disjoint, all of them."""
    seq = 6
    convs = [([i + 1] * seq, [i + 1] * seq) for i in range(10)]  # one conversation fills one sequence

    def firsts(stream: int, n_streams: int, n: int) -> list[int]:
        b = SftBatches(convs, seq, 1, pad_id=0, seed=3, stream=stream, n_streams=n_streams)
        return [int(b.next_batch().tokens_BT[0, 0]) for _ in range(n)]

    one = firsts(0, 1, 10)
    assert sorted(one) == list(range(1, 11))
    for s in range(3):
        assert firsts(s, 3, len(one[s::3])) == one[s::3]
    with pytest.raises(ValueError, match=r"10 SFT conversations cannot feed data\.streams = 16"):
        SftBatches(convs, seq, 1, pad_id=0, stream=0, n_streams=16)


# -- multi-rank: gloo processes ---------------------------------------------------------------------

STEPS = 6
"""Optimizer steps of the 4-rank job: BATCH / MICRO = 4 micro-batches each, 24 in all."""


def _train(rank: int, world: int, fsdp_group: int, ep: int, store_path: str, steps: int) -> dict[str, Any]:
    """`steps` training steps on this rank's own streams; the losses and the data position after them."""
    torch.set_num_threads(1)
    spec = _spec(world, fsdp_group, ep)
    ctx = SimpleNamespace(spec=spec)
    source = _stream_set(store_path)
    training = build_training(ctx, source)  # type: ignore[arg-type]
    plan = TrainPlan("p", 0, steps, 0, SEQ, MICRO, lambda tokens: BATCH, lambda step, tokens: 1.0)
    trainer = Trainer(ctx, training.model, training.optimizer, source, plan, None, sharding=training.sharding)  # type: ignore[arg-type]
    losses = []
    for _ in range(steps):
        r = trainer.train_step()
        update_expert_biases(trainer.model, r.counts_LE, spec.stability.balancing)
        losses.append(r.loss)
    return {"losses": losses, "streams": sorted(source.streams), "state": source.state_dict()}


@pytest.fixture(scope="module")
def four_ranks(store_path: str) -> list[dict[str, Any]]:
    """The job on 4 ranks: HSDP 2 x 2 with experts split over 2."""
    return run_workers(_train, 4, 2, 2, store_path, STEPS, timeout_s=300)


@pytest.mark.slow
def test_losses_of_4_ranks_reading_their_own_streams_equal_one_process(
    store_path: str, four_ranks: list[dict[str, Any]]
) -> None:
    reference = _train(0, 1, 1, 1, store_path, STEPS)
    assert [r["streams"] for r in four_ranks] == [[0], [1], [2], [3]]
    for r in four_ranks:
        assert r["losses"] == pytest.approx(reference["losses"], rel=2e-5)  # test_training_parity's tolerance


def _draw(rank: int, world: int, store_path: str, state: dict[str, Any], n: int) -> dict[str, Any]:
    source = _stream_set(store_path)
    source.load_state_dict(state)
    batches = [source.next_batch().tokens_BT for _ in range(n)]
    return {"batches": batches, "state": source.state_dict(), "streams": sorted(source.streams)}


@pytest.mark.slow
def test_a_data_position_of_4_ranks_resumes_on_2_then_on_1(store_path: str, four_ranks: list[dict[str, Any]]) -> None:
    state = four_ranks[0]["state"]
    assert all(r["state"] == state for r in four_ranks) and state["drawn"] == 4 * STEPS  # the same on every rank
    two = run_workers(_draw, 2, store_path, state, 2)  # micro-batches 24..27
    assert [r["streams"] for r in two] == [[0, 2], [1, 3]]
    one = _draw(0, 1, store_path, two[0]["state"], 4)  # 28..31
    got = [two[r]["batches"][k] for k in range(2) for r in range(2)] + one["batches"]
    want = _global_stream(store_path, 32)[24:]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
