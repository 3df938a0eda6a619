"""Incremental decoding with a KV cache: sliding-window-aware, GQA, batched, greedy or top-p sampling.

The cache holds, per layer, the keys and values the next tokens will attend to:
- global (NoPE) layers keep every key of the sequence (a buffer of `max_len` columns);
- local (RoPE, sliding-window) layers keep only the last `sliding_window` keys, in a ring buffer
  of w slots: column c lives in slot c mod w. Keys are stored already rotated by RoPE at their
  own position, so a query rotated at its position sees the same relative angle as in the full
  forward; nothing is re-rotated when the ring wraps.
Keys and values are stored at the kv-head width (G heads), never repeated to the H query heads.

Batching: prompts of different lengths are LEFT-padded to a common length, so every row's new
token sits at the same column. Column c of row b is the row's position c - pad_b (its RoPE
position; the full forward of the unpadded row uses the same), and keys at columns < pad_b are
padding and never attended to. Because the window is the same number of columns as positions
in every row, one [B, T, S] boolean mask per chunk (causal, window, padding) serves every layer
of its kind. A padding query attends only to padding (never an empty row: no NaN).

`step_logits(model, cache, ids_BT)` runs new tokens through the model against the cache and
appends them; a prompt can be fed in chunks (`prefill`). `generate(...)` is the batched
sampling loop used by RL rollouts and evals; `sample_next` picks tokens from logits.

Legend: B batch, T new tokens, S keys attended (cached + new), D d_model, V vocabulary,
H query heads, G kv heads, K head_dim, W ring slots (= sliding window), M max columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trinity.model.attention import Attention
from trinity.model.moe import MoE
from trinity.model.rope import apply_rope
from trinity.model.transformer import TransformerBlock, TrinityModel


@dataclass
class LayerCache:
    """Keys and values of one layer: all columns (global) or a ring of the last W columns (local)."""

    k_BGMK: torch.Tensor
    v_BGMK: torch.Tensor
    cols_M: torch.Tensor
    """Column held by each slot (-1: empty). Global layers: slot m holds column m."""
    ring: bool


@dataclass
class KVCache:
    """The cache of a batch: one LayerCache per layer, the next column, and each row's left padding."""

    layers: list[LayerCache]
    pad_B: torch.Tensor
    """Left-padding columns of each row."""
    length: int = 0
    """Columns already in the cache."""
    max_len: int = 0


def new_cache(model: TrinityModel, batch: int, max_len: int, pad_B: torch.Tensor | None = None) -> KVCache:
    """An empty cache for `batch` rows of at most `max_len` columns (padding included)."""
    spec = model.spec
    param = next(model.parameters())
    G, K = spec.n_kv_heads, spec.head_dim
    layers = []
    for block in model.layers:
        attn: Attention = block.attn  # type: ignore[assignment]
        slots = min(spec.sliding_window, max_len) if attn.is_local else max_len
        layers.append(
            LayerCache(
                torch.zeros(batch, G, slots, K, dtype=param.dtype, device=param.device),
                torch.zeros(batch, G, slots, K, dtype=param.dtype, device=param.device),
                torch.full((slots,), -1, dtype=torch.long, device=param.device),
                attn.is_local,
            )
        )
    pad = torch.zeros(batch, dtype=torch.long, device=param.device) if pad_B is None else pad_B.to(param.device)
    return KVCache(layers, pad, 0, max_len)


def _chunk_masks(cache: KVCache, T: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [B, 1, T, S] masks (True = may attend) for the global and the local layers.

    Keys are the cached slots followed by the T new columns; the two layer kinds differ in
    which slots they cache, so each gets its own column list.
    """
    device = cache.pad_B.device
    q_cols_T = torch.arange(cache.length, cache.length + T, device=device)
    masks = []
    for ring in (False, True):
        layer = next((lc for lc in cache.layers if lc.ring == ring), None)
        cached_cols = layer.cols_M if layer is not None else torch.zeros(0, dtype=torch.long, device=device)
        k_cols_S = torch.cat([cached_cols, q_cols_T])
        filled_S = k_cols_S >= 0
        causal_TS = k_cols_S[None, :] <= q_cols_T[:, None]
        if ring:
            causal_TS = causal_TS & (k_cols_S[None, :] > q_cols_T[:, None] - window)
        pad_B11 = cache.pad_B[:, None, None]
        k_real_B1S = k_cols_S[None, None, :] >= pad_B11
        q_real_BT1 = q_cols_T[None, :, None] >= pad_B11
        # Real queries see real keys; padding queries see padding keys (so no row is empty).
        same_kind_BTS = k_real_B1S == q_real_BT1
        masks.append((causal_TS & filled_S[None, :] & same_kind_BTS)[:, None])
    return masks[0], masks[1]


def _attend(
    attn: Attention,
    x_BTD: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    lc: LayerCache,
    mask_B1TS: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """The attention sublayer for T new tokens against the layer's cache; writes the new keys."""
    B, T, _ = x_BTD.shape
    H, K = attn.n_heads, attn.head_dim
    q_BTHK, k_BTGK, v_BTGK, gate_BTX = attn.project(x_BTD)
    v_BGTK = v_BTGK.transpose(1, 2)
    if attn.is_local:
        cos, sin = cos_sin
        q_BTHK, k_BTGK = apply_rope(q_BTHK, cos, sin), apply_rope(k_BTGK, cos, sin)
    q_BHTK, k_BGTK = q_BTHK.transpose(1, 2), k_BTGK.transpose(1, 2)

    keys_BGSK = torch.cat([lc.k_BGMK, k_BGTK], dim=2)
    values_BGSK = torch.cat([lc.v_BGMK, v_BGTK], dim=2)
    o_BHTK = F.scaled_dot_product_attention(q_BHTK, keys_BGSK, values_BGSK, attn_mask=mask_B1TS, enable_gqa=True)

    # Write the new columns: global layers at their column, local layers into the ring (only the
    # last W new ones can ever be attended to again).
    cols_T = torch.arange(start, start + T, device=x_BTD.device)
    if lc.ring:
        W = lc.cols_M.shape[0]
        keep = slice(max(0, T - W), T)
        slots_T = cols_T[keep] % W
        lc.k_BGMK[:, :, slots_T] = k_BGTK[:, :, keep]
        lc.v_BGMK[:, :, slots_T] = v_BGTK[:, :, keep]
        lc.cols_M[slots_T] = cols_T[keep]
    else:
        lc.k_BGMK[:, :, start : start + T] = k_BGTK
        lc.v_BGMK[:, :, start : start + T] = v_BGTK
        lc.cols_M[start : start + T] = cols_T

    o_BTX = o_BHTK.transpose(1, 2).reshape(B, T, H * K)
    if gate_BTX is not None:
        o_BTX = o_BTX * torch.sigmoid(gate_BTX)
    out_BTD: torch.Tensor = attn.wo(o_BTX)
    return out_BTD


@torch.no_grad()
def step_logits(model: TrinityModel, cache: KVCache, ids_BT: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of T new tokens per row given everything in the cache; appends them to it.

    Equals the full forward's logits at those positions (no document ids, positions from 0 at
    each row's first real token), to floating-point tolerance.
    """
    T = ids_BT.shape[1]
    start = cache.length
    if start + T > cache.max_len:
        raise ValueError(f"the cache holds {cache.max_len} columns; {start} used, {T} more requested")
    x_BTD = model.tok_embeddings(ids_BT) * model.embed_scale
    cols_BT = torch.arange(start, start + T, device=ids_BT.device)[None] - cache.pad_B[:, None]
    cos_sin = model.rope(cols_BT.clamp(min=0), x_BTD.dtype)
    global_mask, local_mask = _chunk_masks(cache, T, model.spec.sliding_window)
    for block, lc in zip(model.layers, cache.layers, strict=True):
        assert isinstance(block, TransformerBlock)
        mask = local_mask if lc.ring else global_mask
        h_BTD = _attend(block.attn, block.attn_norm(x_BTD), cos_sin, lc, mask, start)
        x_BTD = x_BTD + block.post_attn_norm(h_BTD)
        m_BTD = block.mlp_norm(x_BTD)
        y_BTD = block.mlp(m_BTD)[0] if isinstance(block.mlp, MoE) else block.mlp(m_BTD)
        x_BTD = x_BTD + block.post_mlp_norm(y_BTD)
    cache.length = start + T
    logits_BTV: torch.Tensor = model.output(model.norm(x_BTD))
    return logits_BTV


def prefill(model: TrinityModel, cache: KVCache, ids_BT: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Feed a (left-padded) prompt in chunks of `chunk` columns; returns the last column's logits [B, V]."""
    logits_BTV = None
    for a in range(0, ids_BT.shape[1], chunk):
        logits_BTV = step_logits(model, cache, ids_BT[:, a : a + chunk])
    assert logits_BTV is not None, "empty prompt"
    return logits_BTV[:, -1]


def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next tokens [B]: argmax when temperature == 0, else a draw from the top-p nucleus of softmax(logits / T).

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the
    token that crosses the threshold is kept); probabilities are renormalised within it.
    The draw happens on the generator's device (a CPU generator stays usable for a model on a GPU,
    and the same seed draws the same tokens from the same probabilities on either).
    """
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the more likely tokens
        sorted_BV = torch.where(before_BV < top_p, sorted_BV, torch.zeros_like(sorted_BV))
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    if generator is not None and generator.device != probs_BV.device:
        return torch.multinomial(probs_BV.to(generator.device), 1, generator=generator)[:, 0].to(logits_BV.device)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


@dataclass
class Generation:
    """Generated tokens per row (stop token included when one was produced) and their log-probabilities
    under the model's untempered distribution (what a policy-gradient update needs)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    stopped: list[bool]


@torch.no_grad()
def generate_with_logprobs(
    model: TrinityModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    chunk: int = 512,
) -> Generation:
    """Batched decoding of every prompt (left-padded together); a row stops at its first stop token."""
    B = len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids_BP = torch.full((B, P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BP[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
    ids_BP = ids_BP.to(device)  # built on the host, one copy to the model's device
    pad_B = torch.tensor([P - len(p) for p in prompts], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    cache = new_cache(model, B, P + max_new_tokens, pad_B)
    logits_BV = prefill(model, cache, ids_BP, chunk)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B
    stops = torch.tensor(stop_ids or (-1,), device=device)
    for i in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature, top_p, generator)
        lp_B = torch.log_softmax(logits_BV.float(), dim=-1).gather(1, next_B[:, None])[:, 0]
        is_stop_B = torch.isin(next_B, stops)
        next_b, lp_b, is_stop_b = next_B.tolist(), lp_B.tolist(), is_stop_B.tolist()  # one host copy each
        for b in range(B):
            if not done[b]:
                tokens[b].append(int(next_b[b]))
                logprobs[b].append(float(lp_b[b]))
                done[b] = bool(is_stop_b[b])
        if all(done) or i == max_new_tokens - 1:
            break
        logits_BV = step_logits(model, cache, next_B[:, None])[:, -1]
    model.train(was_training)
    return Generation(tokens, logprobs, done)


def generate(
    model: TrinityModel,
    prompt_ids_list: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """The new tokens of each prompt (greedy when temperature == 0)."""
    out = generate_with_logprobs(
        model, prompt_ids_list, max_new_tokens, temperature, top_p, generator, stop_ids, pad_id
    )
    return out.tokens
