"""Context extension: length-biased document draws (frequencies, contract, exact resume) and the LR rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.data.conftest import make_store
from trinity.data.length_biased import LengthBiasedLoader, length_probabilities
from trinity.nodes.extend import extend_lr_factor
from trinity.spec.stages import ContinueLR, ExtendSpec, RewarmLR

LENGTHS = [10, 40, 160, 640, 20, 80]


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_store(tmp_path / "s", LENGTHS)


def _draw_counts(loader: LengthBiasedLoader, n_seq: int) -> np.ndarray:
    starts = np.zeros(len(LENGTHS))
    for _ in range(n_seq):
        for seq in loader.next_sequences():
            for doc, _k, a, _b in seq:
                if a == loader.store.doc_offsets[doc]:
                    starts[doc] += 1  # a draw begins where the document begins
    return starts


@pytest.mark.parametrize("bias", [0.0, 1.0, 2.0])
def test_documents_are_drawn_in_proportion_to_length_power(store, bias: float) -> None:  # type: ignore[no-untyped-def]
    p = length_probabilities(np.asarray(LENGTHS), bias)
    assert p.sum() == pytest.approx(1.0)
    loader = LengthBiasedLoader(store, 64, 4, bias, seed=1)
    counts = _draw_counts(loader, 600)
    freq = counts / counts.sum()
    assert freq == pytest.approx(p, abs=0.03)  # thousands of draws: well within 0.03
    if bias > 0:
        assert freq[3] > freq[0]


def test_contract_full_sequences_targets_and_unique_draw_ids(store) -> None:  # type: ignore[no-untyped-def]
    loader = LengthBiasedLoader(store, 50, 2, 1.0, seed=0)
    tokens = store.tokens
    for _ in range(20):
        batch = loader.next_batch()
        assert batch.tokens_BT.shape == (2, 50)
        ids = batch.doc_ids_BT.numpy()
        for b in range(2):
            for t in range(49):
                if ids[b, t] == ids[b, t + 1] and batch.targets_BT[b, t] != -100:
                    assert batch.targets_BT[b, t] == batch.tokens_BT[b, t + 1]
            assert set(int(x) % store.n_docs for x in ids[b]) <= set(range(store.n_docs))
    # every (document, draw) id indexes the store and targets come from it
    doc = int(ids[0, 0]) % store.n_docs
    assert int(batch.tokens_BT[0, 0]) in set(tokens[store.doc_offsets[doc] : store.doc_offsets[doc + 1]].tolist())


@pytest.mark.parametrize("buffer", [0, 4])
def test_state_dict_resume_is_exact(store, buffer: int) -> None:  # type: ignore[no-untyped-def]
    a = LengthBiasedLoader(store, 37, 2, 1.0, seed=5, buffer_size=buffer)
    for _ in range(9):
        a.next_batch()
    b = LengthBiasedLoader(store, 37, 2, 1.0, seed=5, buffer_size=buffer)
    b.load_state_dict(a.state_dict())
    for _ in range(15):
        x, y = a.next_batch(), b.next_batch()
        assert (x.tokens_BT == y.tokens_BT).all() and (x.doc_ids_BT == y.doc_ids_BT).all()
    with pytest.raises(ValueError, match="does not match"):
        LengthBiasedLoader(store, 37, 2, 0.5, seed=5, buffer_size=buffer).load_state_dict(a.state_dict())


def test_lr_rules() -> None:
    ext = ExtendSpec(
        tokens=65536,
        seq_len=1024,
        mix={"a": 1.0},
        global_batch_sequences=4,
        lr=RewarmLR(peak_fraction=0.1, warmup_steps=4),
    )
    total = ext.optimizer_steps
    assert total == 16
    f = extend_lr_factor(ext, total)
    assert [round(f(s, 0), 6) for s in (0, 3, 4, 10, 16)] == [0.025, 0.1, 0.1, 0.05, 0.0]
    cont = ext.model_copy(update={"lr": ContinueLR(from_fraction=0.1, to_fraction=0.05, decay="cosine")})
    g = extend_lr_factor(cont, 11)
    assert g(0, 0) == pytest.approx(0.1) and g(10, 0) == pytest.approx(0.05) and g(5, 0) == pytest.approx(0.075)
    lin = ext.model_copy(update={"lr": ContinueLR(from_fraction=0.1, to_fraction=0.0, decay="linear")})
    assert extend_lr_factor(lin, 11)(5, 0) == pytest.approx(0.05)
