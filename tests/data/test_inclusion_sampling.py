"""The paper's extension sampling (trinity.data.inclusion): inclusion frequencies follow the spec'd curve, no
document twice in a pass across streams and workers, a new draw each pass, exact resume, the spec's rules,
and an old spec (no `sampling`) keeps its identity and its length-biased stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import SMALL_GRAPH, mutate
from tests.data.conftest import make_store
from trinity.cli import app
from trinity.data.inclusion import InclusionLoader
from trinity.data.length_biased import LengthBiasedLoader
from trinity.data.packing import PackedLoader, Stream
from trinity.data.rsdb import RsdbStream
from trinity.data.sequential import SequentialStream
from trinity.data.store import TokenStore
from trinity.graph.identity import identity_payload
from trinity.nodes.extend import build_extend_loader
from trinity.spec import data as data_spec
from trinity.spec.stages import ExtendSpec, InclusionSampling

# A scaled-down curve (the presets': 0.01 up to 4096 tokens, 0.9 from 131072), so that 20,000 documents fit
# a test store: p = 0.02 up to 8 tokens, 0.9 from 1024, linear in log length between.
CURVE = InclusionSampling(p_min=0.02, p_max=0.9, min_tokens=8, full_at_tokens=1024)
N_DOCS = 20_000
SIGMAS = 5.0


def curve_p(length: int) -> float:
    """The curve, written out independently of trinity.data.inclusion (the docstring's formula)."""
    if length <= CURVE.min_tokens:
        return CURVE.p_min
    if length >= CURVE.full_at_tokens:
        return CURVE.p_max
    frac = np.log(length / CURVE.min_tokens) / np.log(CURVE.full_at_tokens / CURVE.min_tokens)
    return CURVE.p_min + (CURVE.p_max - CURVE.p_min) * float(frac)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> TokenStore:
    """20,000 documents, lengths log-uniform over 2..2048 tokens (every part of the curve and both flat ends)."""
    rng = np.random.default_rng(7)
    lengths = np.exp(rng.uniform(np.log(2), np.log(2048), N_DOCS)).astype(int)
    return make_store(tmp_path_factory.mktemp("incl") / "s", [int(n) for n in lengths])


def everything_until(loaders: list[PackedLoader], passes: int) -> list[list[int]]:
    """The documents begun in passes 0..passes-1 by every worker stream of `loaders` (ranks), each stream read
    on its own until it starts pass `passes`."""
    merged: list[list[int]] = [[] for _ in range(passes)]
    for loader in loaders:
        for e, docs in enumerate(_per_stream_until(loader, passes)):
            merged[e] += docs
    return merged


def _per_stream_until(loader: PackedLoader, passes: int) -> list[list[int]]:
    """A document is begun where its first segment starts at its first token; a stream is done with the passes
    once it has begun every document they gave it (sequential: it has moved to pass `passes`; RSDB: its refill
    has, and no document of an earlier pass waits unread in its buffer)."""
    out: list[list[int]] = [[] for _ in range(passes)]
    offsets = loader.store.doc_offsets
    for stream in loader.streams:  # each worker stream on its own: its passes end at its own pace
        while not _done(stream, passes):
            for doc, epoch, a, _b in stream.next_sequence():
                if epoch < passes and a == offsets[doc]:
                    out[epoch].append(doc)
    return out


def _done(stream: Stream, passes: int) -> bool:
    if isinstance(stream, RsdbStream):
        waiting = any(e < passes and h == 0 for e, h in zip(stream.buf_epoch, stream.buf_head, strict=True))
        return stream.epoch >= passes and not waiting
    assert isinstance(stream, SequentialStream)
    return stream.epoch >= passes


@pytest.mark.parametrize("buffer", [0, 64], ids=["sequential", "rsdb"])
def test_inclusion_frequency_follows_the_curve(big_store: TokenStore, buffer: int) -> None:
    """Per length bucket (powers of two), the documents read in a pass, over all of them, match the expected
    count sum p_i within 5 binomial sigmas sqrt(sum p_i (1 - p_i)) (the draws are independent Bernoullis)."""
    loader = InclusionLoader(big_store, 256, 4, CURVE, seed=3, buffer_size=buffer)
    (read,) = everything_until([loader], 1)
    assert len(read) == len(set(read)), "a document was read twice in one pass"
    lengths = big_store.doc_lengths
    p = np.array([curve_p(int(n)) for n in lengths])
    bucket = np.floor(np.log2(lengths)).astype(int)
    seen = np.zeros(N_DOCS, dtype=bool)
    seen[read] = True
    for b in np.unique(bucket):
        members = bucket == b
        expected, sd = p[members].sum(), np.sqrt((p[members] * (1 - p[members])).sum())
        observed = int(seen[members].sum())
        assert abs(observed - expected) <= SIGMAS * sd + 1, (b, int(members.sum()), observed, expected, sd)


def test_no_document_twice_in_a_pass_across_streams_and_workers(big_store: TokenStore) -> None:
    """3 data streams x 2 workers split one inclusion set: disjoint, and together exactly what 1 stream reads;
    the next pass is a new draw whose overlap with the first is what independence predicts (sum p_i^2)."""
    many = [InclusionLoader(big_store, 128, 2, CURVE, rank=r, world=3, workers=2, seed=11) for r in range(3)]
    split = everything_until(list(many), 2)
    (one0, one1) = everything_until([InclusionLoader(big_store, 128, 2, CURVE, seed=11)], 2)
    for e, docs in enumerate(split):
        assert len(docs) == len(set(docs)), f"pass {e}: a document read twice across streams"
    assert sorted(split[0]) == sorted(one0) and sorted(split[1]) == sorted(one1)
    p = np.array([curve_p(int(n)) for n in big_store.doc_lengths])
    both = len(set(one0) & set(one1))
    expected, sd = (p**2).sum(), np.sqrt((p**2 * (1 - p**2)).sum())
    assert abs(both - expected) <= SIGMAS * sd, (both, expected, sd)
    assert set(one0) != set(one1)


@pytest.mark.parametrize("buffer", [0, 8], ids=["sequential", "rsdb"])
def test_resume_mid_pass_is_exact(tmp_path: Path, buffer: int) -> None:
    """From a state_dict taken mid-pass, a new loader yields the same tokens and document ids across the pass
    boundaries that follow (the state is the stream's plain ints)."""
    rng = np.random.default_rng(0)
    store = make_store(tmp_path / "s", [int(n) for n in rng.integers(2, 600, 60)])
    a = InclusionLoader(store, 64, 2, CURVE, workers=2, seed=5, buffer_size=buffer)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    b = InclusionLoader(store, 64, 2, CURVE, workers=2, seed=5, buffer_size=buffer)
    b.load_state_dict(state)
    epochs = set()
    for _ in range(320):
        x, y = a.next_batch(), b.next_batch()
        assert (x.tokens_BT == y.tokens_BT).all() and (x.doc_ids_BT == y.doc_ids_BT).all()
        epochs |= {int(i) // store.n_docs for i in x.doc_ids_BT.flatten()}
    assert len(epochs) >= 3, "the comparison did not cross pass boundaries"
    other = CURVE.model_copy(update={"p_max": 0.5})
    with pytest.raises(ValueError, match="does not match"):
        InclusionLoader(store, 64, 2, other, workers=2, seed=5, buffer_size=buffer).load_state_dict(state)


def _extend(**fields: object) -> ExtendSpec:
    return ExtendSpec.model_validate({"tokens": 65536, "seq_len": 64, "mix": {"a": 1.0}, **fields})


def test_old_spec_keeps_its_identity_and_its_stream(tmp_path: Path) -> None:
    """No `sampling`: the identity payload is the one without the field, and the node's loader is the
    length-biased draw of before; with `sampling`, both change."""
    old = _extend(long_doc_bias=1.0, loader={"kind": "sequential"})
    assert "sampling" not in identity_payload(old)
    new = _extend(sampling={"kind": "inclusion"}, loader={"kind": "sequential"})
    assert identity_payload(new)["sampling"]["p_max"] == 0.9
    store = make_store(tmp_path / "s", [10, 40, 160, 640, 20, 80])
    built = build_extend_loader(old, store, 2, seed=4)
    assert isinstance(built, LengthBiasedLoader)
    reference = LengthBiasedLoader(store, 64, 2, 1.0, seed=4)
    for _ in range(5):
        assert (built.next_batch().tokens_BT == reference.next_batch().tokens_BT).all()
    rsdb = build_extend_loader(
        _extend(sampling={"kind": "inclusion"}, loader=data_spec.RsdbLoader(buffer_size=4, workers=1)),
        store,
        2,
        4,
        1,
        2,
    )
    assert isinstance(rsdb, InclusionLoader) and rsdb.kind == "inclusion_rsdb" and rsdb.rank == 1


runner = CliRunner()
EXTEND_MIX = "mix: {docs: 1.0}"

BAD_SAMPLING = [
    ("p_min > p_max", "sampling: {kind: inclusion, p_min: 0.5, p_max: 0.2}", "stages.extend.sampling.p_min"),
    (
        "lengths out of order",
        "sampling: {kind: inclusion, min_tokens: 4096, full_at_tokens: 4096}",
        "stages.extend.sampling.full_at_tokens",
    ),
    ("p_max above 1", "sampling: {kind: inclusion, p_max: 1.5}", "stages.extend.sampling.p_max"),
    ("bias beside sampling", "sampling: {kind: inclusion}\n    long_doc_bias: 2.0", "stages.extend.long_doc_bias"),
]


@pytest.mark.parametrize(("what", "new", "field"), BAD_SAMPLING, ids=[b[0] for b in BAD_SAMPLING])
def test_sampling_errors_name_the_field(tmp_path: Path, what: str, new: str, field: str) -> None:
    text, _line = mutate(SMALL_GRAPH, EXTEND_MIX, f"{EXTEND_MIX}\n    {new}")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert field in result.stderr, result.stderr
    assert "Traceback" not in result.output + result.stderr
