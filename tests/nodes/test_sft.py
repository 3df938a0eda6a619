"""SFT data: the chat template, the assistant-only loss mask, greedy packing and its exact resume."""

from __future__ import annotations

import pytest
import torch

from tests.nodes.fake_tokenizer import CharTokenizer
from trinity.data.chat import Message, SftBatches, math_conversation, math_sft_problems, prompt_ids, render, targets_of
from trinity.optim.schedule import rewarm_factor

SYS, USER, ASSIST, END = 2, 3, 4, 5


def c(text: str) -> list[int]:
    return CharTokenizer().encode(text)


def test_template_and_mask_on_a_hand_built_conversation() -> None:
    tok = CharTokenizer()
    conv = [Message("system", "S"), Message("user", "hi"), Message("assistant", "yo"), Message("user", "?")]
    conv.append(Message("assistant", "ok"))
    ids, trained = render(tok, conv)
    want = [SYS, *c("S"), END, USER, *c("hi"), END, ASSIST, *c("yo"), END, USER, *c("?"), END, ASSIST, *c("ok"), END]
    assert ids == want
    # Trained: the assistant contents and their <|end|>, never the <|assistant|> role token.
    assert [i for i, t in enumerate(trained) if t] == [8, 9, 10, 15, 16, 17]
    targets = targets_of(ids, trained)
    # Position t predicts token t + 1 where t + 1 is trained: positions 7..9 and 14..16.
    assert [t for t, y in enumerate(targets) if y != -100] == [7, 8, 9, 14, 15, 16]
    assert targets[7] == c("y")[0] and targets[9] == END and targets[14] == c("o")[0]
    assert targets[-1] == -100
    assert prompt_ids(tok, conv[:2]) == [SYS, *c("S"), END, USER, *c("hi"), END, ASSIST]


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown chat role"):
        render(CharTokenizer(), [Message("tool", "x")])


def _conv(n: int, fill: int) -> tuple[list[int], list[int]]:
    return [fill] * n, [fill + 100] * n


def test_greedy_packing_pads_and_separates_conversations() -> None:
    convs = [_conv(4, 10), _conv(3, 20), _conv(5, 30), _conv(12, 40)]
    batches = SftBatches(convs, seq_len=8, micro_batch=1, pad_id=1, seed=0)
    order = [int(i) for i in batches._order_of(0)]
    seqs = [batches.next_sequence() for _ in range(4)]
    # Replay the greedy rule by hand on the epoch order.
    lengths = [min(len(convs[i][0]), 8) for i in order]
    expected_rows, row, used = [], [], 0
    for i, n in zip(order, lengths, strict=True):
        if used and used + n > 8:
            expected_rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    expected_rows.append(row)
    for (tok, tgt, doc), row in zip(seqs, expected_rows, strict=False):
        t = 0
        for k, i in enumerate(row):
            n = min(len(convs[i][0]), 8)
            assert (tok[t : t + n] == convs[i][0][0]).all() and (doc[t : t + n] == k).all()
            assert (tgt[t : t + n] == convs[i][1][0]).all()
            t += n
        assert (tok[t:] == 1).all() and (tgt[t:] == -100).all() and (doc[t:] == len(row)).all()
    assert any(len(convs[i][0]) > 8 for r in expected_rows for i in r)  # the long one is cut to fit


def test_state_dict_resumes_the_exact_stream() -> None:
    convs = [_conv(n, 10 + n) for n in (3, 7, 2, 6, 5, 4, 9, 1)]
    a = SftBatches(convs, seq_len=10, micro_batch=2, pad_id=1, seed=3)
    for _ in range(5):
        a.next_batch()
    b = SftBatches(convs, seq_len=10, micro_batch=2, pad_id=1, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(7):  # across epoch boundaries
        x, y = a.next_batch(), b.next_batch()
        assert all(
            torch.equal(u, v)
            for u, v in zip(
                (x.tokens_BT, x.targets_BT, x.doc_ids_BT), (y.tokens_BT, y.targets_BT, y.doc_ids_BT), strict=True
            )
        )
    with pytest.raises(ValueError, match="does not match"):
        SftBatches(convs, seq_len=12, micro_batch=2, pad_id=1, seed=3).load_state_dict(a.state_dict())


def test_loss_is_on_assistant_tokens_only() -> None:
    """The model's CE with SFT targets equals the CE over the assistant positions alone."""
    from tests.model.test_transformer import small_spec
    from trinity.model import TrinityModel

    tok = CharTokenizer()
    ids, trained = render(tok, [Message("user", "abc"), Message("assistant", "de")])
    targets = targets_of(ids, trained)
    torch.manual_seed(0)
    model = TrinityModel(small_spec(vocab_size=tok.vocab_size))
    out = model(torch.tensor([ids]), labels_BT=torch.tensor([targets]))
    logp = torch.log_softmax(out.logits[0].float(), -1)
    positions = [5, 6, 7]  # <|assistant|> predicts 'd', 'd' predicts 'e', 'e' predicts <|end|>
    want = -sum(logp[t, ids[t + 1]] for t in positions) / 3
    torch.testing.assert_close(out.ce_loss, want)


def test_math_conversations_end_with_the_answer_and_lr_rule() -> None:
    problems = math_sft_problems(0, 5)
    assert problems == math_sft_problems(0, 5) and problems != math_sft_problems(1, 5)
    conv = math_conversation(problems[0])
    assert conv[1].content.endswith(f"Answer: {problems[0].answer}")
    # warm-up to 0.1 over 4 steps, then linear to 0 at step 30
    assert [round(rewarm_factor(s, 30, 0.1, 4), 6) for s in (0, 3, 4, 17, 30)] == [0.025, 0.1, 0.1, 0.05, 0.0]
