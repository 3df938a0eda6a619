"""GRPO machinery against hand-computed cases: rewards, advantages, response masks, the clipped loss, KL."""

from __future__ import annotations

import math

import pytest
import torch

from tests.nodes.fake_tokenizer import CharTokenizer
from trinity.data.mathgen import Problem
from trinity.rl.grpo import group_advantages, grpo_loss, policy_batch, token_logprobs
from trinity.rl.rollout import rl_problems, rollout, rollout_generator, score

P = Problem("What is 2 + 3?", "5", "2 + 3 = 5\nAnswer: 5", "add")


@pytest.mark.parametrize(
    ("text", "stopped", "want"),
    [
        ("2 + 3 = 5\nAnswer: 5", True, (1.1, True, True)),
        ("2 + 3 = 5\nAnswer: 5", False, (1.0, True, False)),  # cut off: no format reward
        ("Answer: 6", True, (0.1, False, True)),  # well formed, wrong
        ("it is 5", True, (1.0, True, False)),  # right (last number), no Answer: line
        ("Answer: 10/2", True, (1.1, True, True)),  # equal as rationals
        ("no idea", True, (0.0, False, False)),
    ],
)
def test_rewards(text: str, stopped: bool, want: tuple[float, bool, bool]) -> None:
    r, correct, formatted = score(P, text, stopped, 0.1)
    assert r == pytest.approx(want[0]) and (correct, formatted) == want[1:]


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.1, 0.1, 0.1, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-6)
    mean = (1.1 + 0.1 + 0.1 + 0.0) / 4  # 0.325
    std = math.sqrt(((1.1 - mean) ** 2 + 2 * (0.1 - mean) ** 2 + (0.0 - mean) ** 2) / 4)  # population
    assert adv[0].tolist() == pytest.approx([(x - mean) / (std + 1e-6) for x in (1.1, 0.1, 0.1, 0.0)])
    assert adv[1].tolist() == [0.0] * 4  # equal rewards: no signal
    assert adv[0].sum().item() == pytest.approx(0.0, abs=1e-9)


def test_policy_batch_masks_only_response_tokens() -> None:
    batch = policy_batch([[7, 8, 9], [5]], [[1, 2], [3, 4, 6]], [[-0.5, -0.25], [-1.0, -2.0, -3.0]], pad_id=0)
    assert batch.ids_BT.tolist() == [[7, 8, 9, 1, 2], [5, 3, 4, 6, 0]]
    # Position t predicts token t + 1: response tokens are predicted from the last prompt token on.
    assert batch.targets_BT.tolist() == [[-100, -100, 1, 2, -100], [3, 4, 6, -100, -100]]
    assert batch.mask_BT.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    assert batch.old_logprobs_BT.tolist() == [[0, 0, -0.5, -0.25, 0], [-1.0, -2.0, -3.0, 0, 0]]


def test_clipped_loss_and_k3_kl_by_hand() -> None:
    old = torch.tensor([[-1.0, -1.0, 0.0]])
    new = torch.tensor([[-1.0 + math.log(1.5), -1.0 + math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -0.5, 0.0]])
    mask = torch.tensor([[True, True, False]])
    # Positive advantage: ratio 1.5 is clipped to 1.2; ratio 0.5 stays (min picks 0.5 * A).
    loss, stats = grpo_loss(new, old, torch.tensor([2.0]), mask, clip_eps=0.2, kl_weight=0.5, ref_logp_BT=ref)
    surrogate = (min(1.5 * 2, 1.2 * 2) + min(0.5 * 2, 0.8 * 2)) / 2  # (2.4 + 1.0) / 2
    d = [(-1.0) - new[0, 0].item(), (-0.5) - new[0, 1].item()]
    k3 = sum(math.exp(x) - x - 1 for x in d) / 2
    assert stats.surrogate == pytest.approx(surrogate)
    assert stats.kl == pytest.approx(k3)
    assert loss.item() == pytest.approx(-surrogate + 0.5 * k3)
    assert stats.clip_fraction == pytest.approx(0.5) and stats.tokens == 2
    loss.backward()
    assert new.grad is not None and new.grad[0, 2] == 0  # masked token: no gradient
    # Clipped token with positive advantage: no policy gradient, only the KL term's.
    kl_grad = 0.5 * (1 - math.exp(d[0])) / 2  # d/dnew of (e^(ref-new) - (ref-new) - 1) = 1 - e^d
    assert new.grad[0, 0].item() == pytest.approx(kl_grad)

    # Negative advantage: ratio 0.5 is clipped to 0.8 (min(-1.0, -1.6) = -1.6); ratio 1.5 stays.
    _, stats = grpo_loss(new.detach(), old, torch.tensor([-2.0]), mask, clip_eps=0.2)
    assert stats.surrogate == pytest.approx((min(1.5 * -2, 1.2 * -2) + min(0.5 * -2, 0.8 * -2)) / 2)


def test_token_logprobs_match_log_softmax() -> None:
    from tests.model.test_transformer import small_spec
    from trinity.model import TrinityModel

    torch.manual_seed(0)
    model = TrinityModel(small_spec())
    batch = policy_batch([[7, 8, 9], [5]], [[1, 2], [3, 4, 6]], [[0.0, 0.0], [0.0, 0.0, 0.0]], pad_id=0)
    got = token_logprobs(model, batch.ids_BT, batch.targets_BT)
    logp = torch.log_softmax(model(batch.ids_BT).logits.float(), -1)
    assert got[0, 2].item() == pytest.approx(logp[0, 2, 1].item(), abs=1e-5)
    assert got[1, 2].item() == pytest.approx(logp[1, 2, 6].item(), abs=1e-5)
    assert got[0, 0].item() == 0.0 and got[1, 4].item() == 0.0


def test_rollout_groups_and_determinism() -> None:
    from tests.model.test_transformer import small_spec
    from trinity.model import TrinityModel

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = TrinityModel(small_spec(vocab_size=tok.vocab_size)).eval()
    problems = rl_problems(0, 3, 2)
    assert problems == rl_problems(0, 3, 2) and problems != rl_problems(0, 4, 2)
    a = rollout(model, tok, problems, 3, 6, 1.0, 1.0, 0.1, rollout_generator(0, 3))
    b = rollout(model, tok, problems, 3, 6, 1.0, 1.0, 0.1, rollout_generator(0, 3))
    assert a.response_ids == b.response_ids and a.rewards_PG.shape == (2, 3)
    assert a.prompt_ids[0] == a.prompt_ids[2] != a.prompt_ids[3]  # rows p * G + g
    assert all(len(r) == len(lp) for r, lp in zip(a.response_ids, a.logprobs, strict=True))
    for i, text in enumerate(a.texts):
        stopped = a.response_ids[i][-1] in (tok.special_ids["<|end|>"], tok.special_ids["<|doc|>"])
        assert a.rewards_PG.view(-1)[i].item() == pytest.approx(score(problems[i // 3], text, stopped, 0.1)[0])
