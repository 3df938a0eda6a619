"""A checked export (`trinity.interop.hf.export_pretrained`): what transformers loads from it, checked here
independently of the export's own round trip: logits, shards, tokenizer files, and refusal of a wrong export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open
from transformers import AfmoeForCausalLM, AutoTokenizer

from tests.interop.test_hf import random_spec
from trinity.data.chat import Message, render
from trinity.data.tokenizer import TOKENIZER_FILE, Tokenizer, build_untrained
from trinity.errors import NodeFailure
from trinity.interop import hf as hf_interop
from trinity.interop.hf import INDEX_FILE, export_pretrained
from trinity.model import TrinityModel
from trinity.spec.model import ModelSpec
from trinity.spec.tokenizer import TokenizerSpec

TEXTS = [
    "def f(x):\n    return x * 2  # doubled",
    "1234567 apples, 89 pears",
    "日本語のテキスト and ภาษาไทย",
    "a document that mentions <|doc|> and <|end|> as text",
    "  leading spaces\tand tabs\n\n",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A small trained BPE of trinity's pipeline (digit groups, isolated scripts, the chat specials)."""
    hf_tok, trainer = build_untrained(TokenizerSpec(vocab_size=320, min_frequency=1))
    hf_tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / TOKENIZER_FILE
    path.write_text(hf_tok.to_str())
    return Tokenizer(path)


def trained_model(seed: int) -> tuple[TrinityModel, ModelSpec]:
    spec = random_spec(seed)
    torch.manual_seed(seed)
    model = TrinityModel(spec).eval()
    for moe in model.moe_layers():
        moe.expert_bias.normal_(0, 0.05)  # routing that depends on the bias
    return model, spec


def hf_logits_diff(model: TrinityModel, out: Path, dtype: torch.dtype = torch.float32) -> float:
    """Max |logit difference| of transformers' model loaded from `out` and `model`, on fresh sequences."""
    hf = AfmoeForCausalLM.from_pretrained(out, dtype=dtype).eval()
    ids = torch.randint(0, model.spec.vocab_size, (2, model.spec.sliding_window * 2 + 3))
    with torch.no_grad():
        return (model(ids).logits - hf(ids).logits.float()).abs().max().item()


def test_sharded_export_loads_with_an_index(tok: Tokenizer, tmp_path: Path) -> None:
    model, _ = trained_model(0)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    total = sum(v.numel() * 4 for k, v in hf_interop.to_hf_state_dict(model).items())
    limit = total // 4
    out = tmp_path / "hf"
    result = export_pretrained(model, tok, out, chat=False, shard_bytes=limit)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 4 and result["shards"] == len(shards)
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, 1 + len(shards))
    ]
    assert not (out / "model.safetensors").exists()
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    for shard in shards:  # the index names exactly what each shard holds; no shard beyond the limit but a lone tensor
        with safe_open(str(shard), "pt") as f:
            names = set(f.keys())
        assert names == {n for n, s in weight_map.items() if s == shard.name}
        assert shard.stat().st_size <= limit + 4096 or len(names) == 1
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())  # float32: nothing rounded
    assert hf_logits_diff(model, out) < 1e-4
    assert result["check"]["max_abs_diff"] < 1e-4
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_one_file_when_it_fits_and_bfloat16(tok: Tokenizer, tmp_path: Path) -> None:
    model, _ = trained_model(1)
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "hf"
    out.mkdir()  # an empty folder may be the target
    result = export_pretrained(model, tok, out, chat=False, dtype="bfloat16")
    assert (out / "model.safetensors").is_file() and not (out / INDEX_FILE).exists() and result["shards"] == 1
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {torch.bfloat16}
        on_disk = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(on_disk, exact["tok_embeddings.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # The check compares the same (rounded) weights in float32 on both sides; so does this test.
    assert hf_logits_diff(model, out) < 1e-4
    unrounded = TrinityModel(model.spec).eval()
    unrounded.load_state_dict(exact)
    assert hf_logits_diff(unrounded, out) > 1e-4  # so bfloat16 really rounded the weights


def test_tokenizer_files_encode_as_trinity(tok: Tokenizer, tmp_path: Path) -> None:
    model, _ = trained_model(2)
    out = tmp_path / "hf"
    result = export_pretrained(model, tok, out, chat=True)
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert hf_tok.eos_token == "<|end|>" and hf_tok.pad_token_id == tok.pad_id
    conversation = [Message("system", "be brief"), Message("user", "1234567?"), Message("assistant", "89")]
    rendered = hf_tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation],
        tokenize=True,
        tokenizer_kwargs={"split_special_tokens": False},
    )["input_ids"]
    assert rendered == render(tok, conversation)[0]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == result["generation"]
    assert sorted(generation["eos_token_id"]) == sorted({tok.special_ids["<|end|>"], tok.doc_id})


def test_a_wrong_mapping_is_refused_and_leaves_nothing(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renaming bug (gate and up of the dense MLP swapped: same shapes, loads fine) fails the check."""
    model, _ = trained_model(3)
    right = hf_interop.to_hf_state_dict

    def swapped(m: TrinityModel) -> dict[str, torch.Tensor]:
        sd = right(m)
        gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        sd[gate], sd[up] = sd[up], sd[gate]
        return sd

    monkeypatch.setattr(hf_interop, "to_hf_state_dict", swapped)
    out = tmp_path / "hf"
    with pytest.raises(NodeFailure, match=r"max \|logit difference\| .* > 0.0001"):
        export_pretrained(model, tok, out, chat=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_non_empty_target_is_refused(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(NodeFailure, match="not an empty folder"):
        export_pretrained(trained_model(4)[0], tok, tmp_path / "hf", chat=False)
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
