"""Layout-independent initialisation (trinity.model.init, TrinityModel's init_weights).

Checked against: a pure-Python SplitMix64 (the bits), the closed-form truncated normal (the values'
distribution), and a model built eagerly on the CPU (a model built on `meta`, materialised with
garbage and initialised must equal it bit for bit, buffers included). Shards against the whole
model: tests/distributed/test_meta_init.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.model.test_transformer import small_spec
from trinity.model import TrinityModel, init_weights
from trinity.model.init import canonical_name, fill_truncated_normal, param_key, uniform_bits
from trinity.model.rope import RotaryEmbedding

M64 = (1 << 64) - 1


def _splitmix_mix(z: int) -> int:
    """SplitMix64's finaliser on Python ints (Steele, Lea, Flood 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_bits_are_splitmix64_of_the_index_and_key() -> None:
    k1, k2 = param_key(7, "layers.0.attn.wq.weight")
    index = torch.tensor([0, 1, 2, 12345, 2**40 + 3])
    got = [v & M64 for v in uniform_bits((k1, k2), index).tolist()]
    first = [_splitmix_mix(((i + 1) * 0x9E3779B97F4A7C15 + k1) & M64) for i in index.tolist()]
    want = [_splitmix_mix(z ^ (k2 & M64)) for z in first]
    assert got == want


@pytest.mark.parametrize(("std", "truncation"), [(0.02, 3.0), (1.5, 2.0)])
def test_values_follow_the_truncated_normal(std: float, truncation: float) -> None:
    """Kolmogorov-Smirnov distance to the closed-form CDF, the closed-form variance, the cut."""
    w = torch.empty(512, 400)
    fill_truncated_normal(w, 0, "w", std, truncation)
    x = w.double().flatten().sort().values / std
    n, t = x.numel(), truncation
    phi = lambda v: 0.5 * (1 + torch.erf(v / math.sqrt(2)))  # noqa: E731
    mass = 2 * phi(torch.tensor(t)).item() - 1
    cdf = (phi(x) - phi(torch.tensor(-t))) / mass
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)  # the 1% critical value
    var = 1 - 2 * t * math.exp(-t * t / 2) / math.sqrt(2 * math.pi) / mass
    assert x.var().item() == pytest.approx(var, rel=0.02)
    assert x.mean().item() == pytest.approx(0.0, abs=4 * math.sqrt(var / n))
    assert x.abs().max().item() <= t * (1 + 1e-6) and x.abs().max().item() > 0.99 * t
    # Rows and parameters are independent streams: correlations at the noise level.
    other = torch.empty(512, 400)
    fill_truncated_normal(other, 0, "v", std, truncation)
    for a, b in ((w[0], w[1]), (w.flatten(), other.flatten()), (w[:, 0], w[:, 1])):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())


def test_meta_build_materialised_with_garbage_equals_the_eager_model() -> None:
    spec = small_spec(init=dict(std=0.05, truncation=2.0))
    eager = TrinityModel(spec)
    init_weights(eager, seed=11)
    with torch.device("meta"):
        lazy = TrinityModel(spec)
    assert all(t.is_meta for t in (*lazy.parameters(), *lazy.buffers()))
    lazy.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*lazy.parameters(), *lazy.buffers()):
            t.fill_(float("nan"))
    lazy.head_grad_ratio.value = 0.7
    init_weights(lazy, seed=11)
    want = {**dict(eager.named_parameters()), **dict(eager.named_buffers())}
    got = {**dict(lazy.named_parameters()), **dict(lazy.named_buffers())}
    assert got.keys() == want.keys()
    assert [n for n in want if not torch.equal(got[n], want[n])] == []
    assert torch.equal(lazy.rope.inv_freq_F, RotaryEmbedding(spec.head_dim, spec.rope_theta).inv_freq_F)
    assert lazy.head_grad_ratio.value == 0.0
    w = lazy.layers[0].attn.wq.weight
    # 0.8796: the std of a standard normal truncated at +-2.
    assert w.abs().max().item() <= 2 * 0.05 and w.std().item() == pytest.approx(0.8796 * 0.05, rel=0.05)


def test_seeds_and_names_select_the_stream() -> None:
    spec = small_spec()
    a, b, c = TrinityModel(spec), TrinityModel(spec), TrinityModel(spec)
    init_weights(a, seed=1)
    init_weights(b, seed=1)
    init_weights(c, seed=2)
    assert torch.equal(a.layers[0].attn.wq.weight, b.layers[0].attn.wq.weight)
    assert not torch.equal(a.layers[0].attn.wq.weight, c.layers[0].attn.wq.weight)
    # Same shape, different name: different values.
    assert not torch.equal(a.layers[0].attn.wk.weight, a.layers[0].attn.wv.weight)
    # Without a seed, torch's global generator picks one: torch.manual_seed still reproduces a model.
    torch.manual_seed(5)
    d = TrinityModel(spec)
    torch.manual_seed(5)
    assert torch.equal(TrinityModel(spec).output.weight, d.output.weight)
    # Wrappers (activation checkpointing, torch.compile) do not change a parameter's stream.
    wrapped = "layers.0._checkpoint_wrapped_module.attn.wq.weight"
    assert canonical_name(wrapped) == "layers.0.attn.wq.weight"
    assert param_key(1, wrapped) == param_key(1, "layers.0.attn.wq.weight")
