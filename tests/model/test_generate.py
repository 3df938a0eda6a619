"""Cached decoding against the full forward: logits past the sliding window, GQA, left-padded batches."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_transformer import small_spec
from trinity.model import TrinityModel
from trinity.model.generate import generate, generate_with_logprobs, new_cache, prefill, sample_next, step_logits


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _model(seed: int = 0, **kw: object) -> TrinityModel:
    torch.manual_seed(seed)
    model = TrinityModel(small_spec(**kw))
    # Larger weights than the init so that differences would show in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
    return model.eval()


def _full_logits(model: TrinityModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("prefix", [1, 5, 13])
def test_token_by_token_equals_full_forward_past_the_window(prefix: int) -> None:
    """Window 8, 4 query heads over 2 kv heads: 30 tokens, the ring wraps several times."""
    model = _model()
    assert model.spec.sliding_window == 8 and model.spec.n_heads != model.spec.n_kv_heads
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    full = _full_logits(model, ids)
    cache = new_cache(model, 1, 30)
    got = [step_logits(model, cache, torch.tensor([ids[:prefix]]))[0]]
    for t in range(prefix, 30):
        got.append(step_logits(model, cache, torch.tensor([[ids[t]]]))[0])
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_longer_than_the_window() -> None:
    model = _model(1)
    ids = torch.randint(0, 97, (41,), generator=torch.Generator().manual_seed(4)).tolist()
    full = _full_logits(model, ids)
    cache = new_cache(model, 1, 41)
    chunks = [step_logits(model, cache, torch.tensor([ids[a : a + 11]]))[0] for a in range(0, 41, 11)]
    torch.testing.assert_close(torch.cat(chunks), full, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_matches_each_row_alone() -> None:
    """Rows of different lengths decoded together give each row's own full-forward logits."""
    model = _model(2)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 17, 10)]
    new = 14  # decoded tokens per row: every row runs past the window of 8
    conts = [torch.randint(1, 97, (new,), generator=g).tolist() for _ in rows]
    P = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :] = torch.tensor(r)
    pad = torch.tensor([P - len(r) for r in rows])
    cache = new_cache(model, len(rows), P + new, pad)
    last = prefill(model, cache, ids, chunk=6)
    steps = [last]
    for t in range(new - 1):
        steps.append(step_logits(model, cache, torch.tensor([[c[t]] for c in conts]))[:, -1])
    for b, (r, c) in enumerate(zip(rows, conts, strict=True)):
        full = _full_logits(model, r + c[:-1])[len(r) - 1 :]
        torch.testing.assert_close(torch.stack([s[b] for s in steps]), full, rtol=1e-4, atol=1e-4)


def test_greedy_generate_equals_argmax_of_repeated_full_forwards() -> None:
    model = _model(3)
    prompts = [[5, 9, 11], [7] * 12, [1, 2]]
    out = generate(model, prompts, max_new_tokens=15, temperature=0.0)
    for p, o in zip(prompts, out, strict=True):
        seq = list(p)
        for _ in range(15):
            seq.append(int(_full_logits(model, seq)[-1].argmax()))
        assert o == seq[len(p) :]


def test_stop_token_ends_a_row_and_logprobs_are_the_untempered_ones() -> None:
    model = _model(4)
    prompts = [[5, 9, 11], [3, 4]]
    first = generate(model, prompts, max_new_tokens=6)
    stop = first[0][2]  # row 0 stops at its third token (or earlier if the token repeats)
    out = generate_with_logprobs(model, prompts, 6, stop_ids=(stop,))
    k = first[0].index(stop) + 1
    assert out.tokens[0] == first[0][:k] and out.stopped[0]
    seq = prompts[1] + out.tokens[1]
    logp = torch.log_softmax(_full_logits(model, seq[:-1]), -1)
    want = [float(logp[len(prompts[1]) - 1 + i, tok]) for i, tok in enumerate(out.tokens[1])]
    assert out.logprobs[1] == pytest.approx(want, abs=1e-4)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top_p 0.6: 0.5 alone is below 0.6, so the nucleus is {0, 1}; 2 and 3 never appear.
    draws = sample_next(logits.expand(4000, 4), 1.0, 0.6, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    assert sample_next(logits, 0.0, 1.0).item() == 0
    a = sample_next(logits.expand(50, 4), 1.0, 1.0, torch.Generator().manual_seed(7))
    b = sample_next(logits.expand(50, 4), 1.0, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and set(a.tolist()) > {0}
