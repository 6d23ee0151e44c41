"""Attention variants that need no sink: softmax, sigmoid, ELU+1, a learned sink logit and gated output.

Softmax makes every query row sum to 1, so a head with nothing to read must park its mass somewhere,
and models learn to park it on the first token (Xiao et al. 2024; Gu et al. 2025, "When Attention
Sink Emerges in Language Models"). The variants here remove that constraint in four ways:

- ``sigmoid_attention``: sigmoid(QKᵀ/√d + b)·V with b = −ln(n) (Ramapuram et al. 2024, Apple's
  "Theory, Analysis and Best Practices for Sigmoid Self-Attention"); rows are *not* normalised.
- ``elu1_attention``: (elu(QKᵀ/√d) + 1)·V, unnormalised (Gu et al.'s sink-free variant) or divided by
  the row sum (``normalize=True``).
- ``sink_logit_attention``: softmax over the keys plus one learned logit s_h per head whose column is
  dropped (gpt-oss; s = 0 is "softmax + 1"). Equal to softmax output × sigmoid(lse − s_h).
- ``gated_attention``: the softmax output of every head times a sigmoid gate computed from the block's
  normalised input (G1 of Qiu et al. 2025, "Gated Attention for Large Language Models", Qwen3-Next).

Every function takes q (B, H, T, d) and k, v (B, H_kv, S, d) with H a multiple of H_kv (grouped-query
attention), returns (B, H, T, d) — and, with ``return_probs=True``, also the attention weights
(B, H, T, S) actually applied to V. Masks: ``attention_mask`` is a boolean "may attend" mask or an
additive float mask broadcastable to (B, H, T, S), or a 2-D (B, S) key-padding mask (1 = real token);
``is_causal`` adds a causal mask aligned to the *last* key (query i of T sees keys ≤ i + S − T, the
KV-cache convention). A query row with no allowed key returns zeros. Softmax variants run through
PyTorch's ``scaled_dot_product_attention`` (fused kernels on CUDA, fp32 or bf16); the others are a few
matrix products that run anywhere. Reference code was read, not copied (see REFERENCE_NOTES.md §3–4).

Shapes: B batch, H query heads, H_kv key/value heads, T queries, S keys, d head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "softmax_attention",
    "sigmoid_attention",
    "elu1_attention",
    "sink_logit_attention",
    "gated_attention",
    "allowed_mask",
]


def _expand_kv(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, S, d) -> (B, H, S, d): each key/value head serves H / H_kv query heads."""
    heads, kv_heads = q.shape[1], x.shape[1]
    if heads == kv_heads:
        return x
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads")
    return x.repeat_interleave(heads // kv_heads, dim=1)


def allowed_mask(
    attention_mask: torch.Tensor | None, is_causal: bool, t: int, s: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a user mask into a boolean "may attend" mask and an additive float bias, both (B|1, H|1, T, S).

    Either may be None. A float mask's entries at or below half the dtype's lowest value count as
    "not allowed" (Hugging Face's eager masks use ``finfo.min``); other float entries stay as a bias.
    """
    allowed = bias = None
    if attention_mask is not None:
        mask = attention_mask.to(device)
        if mask.ndim == 2:  # (B, S) key padding: 1 / True = a real token
            mask = mask.bool()[:, None, None, :]
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            floor = torch.finfo(mask.dtype).min / 2
            allowed = mask > floor
            bias = torch.where(allowed, mask, torch.zeros((), dtype=mask.dtype, device=device))
            if not bias.any():
                bias = None
    if is_causal:
        rows = torch.arange(t, device=device)[:, None] + (s - t)  # bottom-right aligned
        causal = torch.arange(s, device=device)[None, :] <= rows  # (T, S)
        allowed = causal if allowed is None else allowed & causal
    return allowed, bias


def _scores(q, k, scale, allowed, bias) -> torch.Tensor:
    """Scaled logits (B, H, T, S) with the bias added; masked entries are -inf."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return scale if scale is not None else q.shape[-1] ** -0.5


def _result(out: torch.Tensor, probs: torch.Tensor | None, return_probs: bool):
    return (out, probs) if return_probs else out


def _softmax_probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; rows with no allowed key (all -inf) give zeros, not NaN."""
    return torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(scores.dtype)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
    return_probs: bool = False,
):
    """Standard attention via ``F.scaled_dot_product_attention``: softmax(QKᵀ·scale + mask)·V."""
    t, s = q.shape[-2], k.shape[-2]
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    scale = _scale(q, scale)
    if is_causal and attention_mask is None and t == s:  # the fused kernels' fast path
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
        allowed, bias = allowed_mask(None, True, t, s, q.device) if return_probs else (None, None)
    else:
        allowed, bias = allowed_mask(attention_mask, is_causal, t, s, q.device)
        sdpa_mask = allowed
        if bias is not None:  # one additive mask carrying both
            sdpa_mask = bias.to(q.dtype).masked_fill(~allowed, float("-inf")) if allowed is not None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale, dropout_p=dropout)
        if allowed is not None:  # rows with nothing to attend to: zeros on every backend
            out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    probs = _softmax_probs(_scores(q, k, scale, allowed, bias)) if return_probs else None
    return _result(out, probs, return_probs)


def _pointwise(q, k, v, act, *, attention_mask, is_causal, scale, normalize, return_probs, eps=1e-8):
    """act(QKᵀ·scale + mask bias) with disallowed entries zeroed, optionally row-normalised, then ·V."""
    t, s = q.shape[-2], k.shape[-2]
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    allowed, bias = allowed_mask(attention_mask, is_causal, t, s, q.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * _scale(q, scale)  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    weights = act(scores)  # (B, H, T, S)
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    out = torch.matmul(weights, v)  # (B, H, T, d)
    return _result(out, weights, return_probs)


def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    bias: float | None = None,
    return_probs: bool = False,
):
    """sigmoid(QKᵀ·scale + b)·V, rows not normalised. ``bias`` b defaults to −ln(S), S the number of keys.

    A model converted for training fixes b = −ln(training context) so it does not drift with the cache.
    """
    b = -math.log(k.shape[-2]) if bias is None else float(bias)
    return _pointwise(
        q, k, v, lambda x: torch.sigmoid(x + b),
        attention_mask=attention_mask, is_causal=is_causal, scale=scale, normalize=False, return_probs=return_probs,
    )


def elu1_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    normalize: bool = False,
    return_probs: bool = False,
):
    """(elu(QKᵀ·scale) + 1)·V; with ``normalize`` each row is divided by its sum (+1e-8) first."""
    return _pointwise(
        q, k, v, lambda x: F.elu(x) + 1.0,
        attention_mask=attention_mask, is_causal=is_causal, scale=scale, normalize=normalize, return_probs=return_probs,
    )


def sink_logit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_logits: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_probs: bool = False,
):
    """Softmax with one extra logit s_h per head (``sink_logits`` (H,)) whose column is dropped.

    Computed by SDPA with one extra key that every query sees: queries get a constant 1 appended,
    real keys a 0, the sink key the value s_h / scale, and its value vector is zero. So the result is
    exactly softmax([s_h, QKᵀ·scale])[1:]·V = softmax(QKᵀ·scale)·V × sigmoid(lse − s_h), on the fused
    kernels and with gradients for s_h. The probabilities returned sum to 1 − (sink share) per row.
    """
    b, h, t, d = q.shape
    s = k.shape[-2]
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    scale = _scale(q, scale)
    sinks = sink_logits.to(q.dtype).reshape(1, h, 1, 1)
    pad = 8 - d % 8  # the extra channel, padded so fused kernels still accept the head dim
    q_aug = F.pad(q, (0, pad))  # (B, H, T, d + pad)
    q_aug[..., d] = 1.0
    k_aug = F.pad(k, (0, pad))  # (B, H, S, d + pad)
    sink_key = torch.zeros(b, h, 1, d + pad, dtype=q.dtype, device=q.device)
    sink_key = sink_key + F.pad(sinks / scale, (d, pad - 1))  # (B, H, 1, d + pad): s_h / scale at channel d
    k_aug = torch.cat([sink_key, k_aug], dim=2)  # (B, H, 1 + S, d + pad)
    v_aug = torch.cat([torch.zeros_like(v[:, :, :1]), v], dim=2)  # (B, H, 1 + S, d)
    allowed, bias = allowed_mask(attention_mask, is_causal, t, s, q.device)
    sdpa_mask = None
    if allowed is not None or bias is not None:
        shape = torch.broadcast_shapes(*(m.shape for m in (allowed, bias) if m is not None))
        full = torch.zeros(shape, dtype=q.dtype, device=q.device)
        if bias is not None:
            full = full + bias.to(q.dtype)
        if allowed is not None:
            full = full.masked_fill(~allowed, float("-inf"))
        sdpa_mask = F.pad(full, (1, 0))  # the sink column is always allowed
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=sdpa_mask, scale=scale)  # (B, H, T, d)
    probs = None
    if return_probs:
        scores = _scores(q, k, scale, allowed, bias)  # (B, H, T, S)
        with_sink = torch.cat([sinks.expand(b, h, t, 1).to(scores.dtype), scores], dim=-1)
        probs = _softmax_probs(with_sink)[..., 1:]
    return _result(out, probs, return_probs)


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_probs: bool = False,
):
    """Softmax attention (SDPA) times sigmoid(``gate_logits``): (B, H, T, 1) headwise or (B, H, T, d) elementwise.

    In a model the gate logits are X·W_g of the block's normalised input X, the same X the queries
    come from (G1 of Qiu et al. 2025); ``sinkless.attention.convert`` wires that up with hooks.
    """
    out = softmax_attention(q, k, v, attention_mask=attention_mask, is_causal=is_causal, scale=scale, return_probs=return_probs)
    out, probs = out if return_probs else (out, None)
    gated = out * torch.sigmoid(gate_logits).to(out.dtype)  # (B, H, T, d)
    return _result(gated, probs, return_probs)
