"""Initialisation that does not depend on how the model is laid out over ranks.

A full-size model is built on the `meta` device, sharded, then materialised: each rank holds only
its shards and must fill them with exactly the values a single process would give the same
elements of the whole model. So no value here comes from a sequential random generator: element i
(the row-major flat index in the FULL parameter) of the parameter called `name` is a function of
(seed, name, i) alone, computed for just the indices a shard holds:

    k1, k2   = two 64-bit words of sha256("<seed>/<name>")          (the parameter's key)
    bits_i   = mix(mix(k1 + (i + 1) * GOLDEN) ^ k2)                 (counter-based, SplitMix64's mix)
    u_i      = ((bits_i >>> 11) + 1/2) / 2^53                       (uniform on (0, 1))
    x_i      = std * sqrt(2) * erfinv(2 (P(-t) + u_i (P(t) - P(-t))) - 1)

x_i is the inverse CDF of the standard normal truncated to [-t, t] (P its CDF; the method of
torch.nn.init.trunc_normal_), evaluated in float64, rounded to the parameter's dtype and clipped
to +-t std. Integer ops are exact (int64 wraps mod 2^64) and every float op is elementwise and
position-independent, so a shard's values are bit-identical to the same slice of the whole
parameter on the same kind of device. The second mix keyed by k2 makes the key 128 bits: two
parameters whose k1 differ by a multiple of GOLDEN still get unrelated streams.

Work is chunked by rows (all dims but the last) into at most CHUNK_ELEMENTS values at a time, on
the parameter's own device, so no temporary is larger than a chunk (and never larger than the
shard, or one row).

Legend: R rows of a shard (its elements over the last dim), C columns (the last dim).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

CHUNK_ELEMENTS = 1 << 20
"""Values generated at once (int64 and float64 temporaries: ~16 MiB each)."""

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
"""Name components that wrappers (activation checkpointing, torch.compile, FSDP1) add: dropped from
the key so that wrapping never changes the weights."""


def _signed(v: int) -> int:
    """The int64 with the same 64 bits as the unsigned v."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 bit patterns, in place (multiplication wraps mod 2^64; `tmp`
    is scratch of z's shape). In place because a fresh temporary per op made it 3x slower on CPU."""
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(_signed(mult))
    return z


def param_key(seed: int, name: str) -> tuple[int, int]:
    """(k1, k2): the parameter's 128-bit key, as two int64 bit patterns."""
    digest = hashlib.sha256(f"{int(seed)}/{canonical_name(name)}".encode()).digest()
    return _signed(int.from_bytes(digest[:8], "little")), _signed(int.from_bytes(digest[8:16], "little"))


def canonical_name(name: str) -> str:
    """The parameter's name in the bare model (wrapper components removed)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def uniform_bits(key: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """64 random bits (as int64) for each flat index (int64 tensor) of the parameter with `key`."""
    k1, k2 = key
    z = (index + 1).mul_(_signed(_GOLDEN)).add_(k1)
    tmp = torch.empty_like(z)
    return _mix_(_mix_(z, tmp).bitwise_xor_(k2), tmp)


def truncated_normal_from_bits(bits: torch.Tensor, std: float, truncation: float) -> torch.Tensor:
    """float64 draws of N(0, std^2) truncated to +-truncation std, by the inverse CDF of 64-bit patterns."""
    u = (_shr(bits, 11).to(torch.float64) + 0.5) * 2.0**-53
    p_lo = 0.5 * (1.0 + math.erf(-truncation / math.sqrt(2.0)))
    p_hi = 0.5 * (1.0 + math.erf(truncation / math.sqrt(2.0)))
    v = u.mul_(p_hi - p_lo).add_(p_lo).mul_(2.0).sub_(1.0)
    return v.erfinv_().mul_(std * math.sqrt(2.0))


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(this process's piece of p, the flat index in the full p of each of its rows' first column
    (int64 [R]), the full p's number of columns)."""
    if isinstance(p, DTensor):
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        local = p.to_local()
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"local shard {tuple(local.shape)} of a {tuple(p.shape)} parameter; expected {shape}")
    else:
        local, shape, offset = p, tuple(p.shape), (0,) * p.ndim
    full = tuple(p.shape)
    strides = [math.prod(full[d + 1 :]) for d in range(len(full))]
    device = local.device
    start_R = torch.zeros((), dtype=torch.int64, device=device)
    for d in range(len(full) - 1):  # broadcast sum over the row dims, then flatten
        idx = (torch.arange(shape[d], dtype=torch.int64, device=device) + offset[d]) * strides[d]
        start_R = start_R[..., None] + idx
    return local, start_R.reshape(-1) + (offset[-1] if full else 0), full[-1] if full else 1


@torch.no_grad()
def fill_truncated_normal(p: torch.Tensor, seed: int, name: str, std: float, truncation: float) -> None:
    """Fill p (or, for a DTensor, this rank's shard of it) with its elements' draws (module docstring)."""
    local, start_R, _ = _local_rows(p)
    if local.numel() == 0:
        return
    key = param_key(seed, name)
    cols = local.shape[-1] if local.ndim else 1
    col_C = torch.arange(cols, dtype=torch.int64, device=local.device)
    cut = truncation * std
    rows_per_chunk = max(1, CHUNK_ELEMENTS // cols)
    out = local.view(-1, cols) if local.is_contiguous() else None
    pieces = []
    for r0 in range(0, start_R.numel(), rows_per_chunk):
        index_RC = start_R[r0 : r0 + rows_per_chunk, None] + col_C
        x = truncated_normal_from_bits(uniform_bits(key, index_RC), std, truncation).to(local.dtype).clamp_(-cut, cut)
        if out is not None:
            out[r0 : r0 + x.shape[0]].copy_(x)
        else:
            pieces.append(x)
    if out is None:  # a strided shard: assemble it (at most the shard's size) and copy once
        local.copy_(torch.cat(pieces).view(local.shape))


@torch.no_grad()
def fill_constant(p: torch.Tensor, value: float) -> None:
    """Set p (or this rank's shard of it) to `value` everywhere."""
    (p.to_local() if isinstance(p, DTensor) else p).fill_(value)
