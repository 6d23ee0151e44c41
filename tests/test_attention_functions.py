"""The attention variants against naive reference implementations, with causal and padding masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sinkless.attention import (
    elu1_attention,
    gated_attention,
    sigmoid_attention,
    sink_logit_attention,
    softmax_attention,
)

B, H, HKV, T, S, D = 2, 4, 2, 5, 7, 8


def _inputs(dtype=torch.float32, t=T, s=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, t, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, s, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, s, D, generator=g).to(dtype)
    pad = torch.ones(B, s, dtype=torch.bool)
    pad[0, :2] = False  # left padding of the first sequence
    return q, k, v, pad


def _naive_allowed(pad, causal, t, s):
    """(B, H, T, S) bool, written out with loops: the reference for every mask."""
    allowed = torch.zeros(B, H, t, s, dtype=torch.bool)
    for b in range(B):
        for i in range(t):
            for j in range(s):
                ok = pad is None or bool(pad[b, j])
                if causal:
                    ok = ok and j <= i + (s - t)
                allowed[b, :, i, j] = ok
    return allowed


def _naive_scores(q, k, allowed):
    k = k.float().repeat_interleave(H // HKV, dim=1)
    return (q.float() @ k.transpose(-1, -2)) / math.sqrt(D), allowed


def _close(a, b, tol=1e-5, what=""):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"{what}: max |diff| = {diff:.3e} > {tol:.0e}"


MASKS = [(None, False), ("pad", False), (None, True), ("pad", True)]


@pytest.mark.parametrize("mask,causal", MASKS)
def test_softmax_matches_naive(mask, causal):
    q, k, v, pad = _inputs()
    pad = pad if mask else None
    scores, allowed = _naive_scores(q, k, _naive_allowed(pad, causal, T, S))
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0)
    ref = probs @ v.float().repeat_interleave(2, 1)
    out, p = softmax_attention(q, k, v, attention_mask=pad, is_causal=causal, return_probs=True)
    _close(out, ref, what="softmax output")
    _close(p, probs, what="softmax probabilities")


@pytest.mark.parametrize("mask,causal", MASKS)
def test_sigmoid_matches_naive_and_rows_are_not_normalised(mask, causal):
    q, k, v, pad = _inputs()
    pad = pad if mask else None
    scores, allowed = _naive_scores(q, k, _naive_allowed(pad, causal, T, S))
    weights = torch.sigmoid(scores - math.log(S)) * allowed  # b = -ln(n)
    ref = weights @ v.float().repeat_interleave(2, 1)
    out, p = sigmoid_attention(q, k, v, attention_mask=pad, is_causal=causal, return_probs=True)
    _close(out, ref, what="sigmoid output")
    _close(p, weights, what="sigmoid weights")
    row_sums = p.sum(-1)[allowed.any(-1)]
    assert (row_sums - 1).abs().max() > 0.05, "sigmoid rows must not be normalised"
    out_b = sigmoid_attention(q, k, v, attention_mask=pad, is_causal=causal, bias=-2.0)
    _close(out_b, (torch.sigmoid(scores - 2.0) * allowed) @ v.float().repeat_interleave(2, 1), what="sigmoid with a fixed bias")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mask,causal", MASKS)
def test_elu1_matches_naive(mask, causal, normalize):
    q, k, v, pad = _inputs()
    pad = pad if mask else None
    scores, allowed = _naive_scores(q, k, _naive_allowed(pad, causal, T, S))
    weights = (F.elu(scores) + 1) * allowed
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-8)
    ref = weights @ v.float().repeat_interleave(2, 1)
    out, p = elu1_attention(q, k, v, attention_mask=pad, is_causal=causal, normalize=normalize, return_probs=True)
    _close(out, ref, tol=2e-5, what="elu+1 output")
    _close(p, weights, tol=2e-5, what="elu+1 weights")


@pytest.mark.parametrize("mask,causal", MASKS)
def test_sink_logit_equals_softmax_times_sigmoid_lse_minus_s(mask, causal):
    q, k, v, pad = _inputs()
    pad = pad if mask else None
    sinks = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    scores, allowed = _naive_scores(q, k, _naive_allowed(pad, causal, T, S))
    masked = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(masked, -1, keepdim=True)  # (B, H, T, 1)
    soft = torch.softmax(masked, -1).nan_to_num(0) @ v.float().repeat_interleave(2, 1)
    ref = soft * torch.sigmoid(lse - sinks[None, :, None, None])
    out, p = sink_logit_attention(q, k, v, sinks, attention_mask=pad, is_causal=causal, return_probs=True)
    _close(out, ref, what="sink logit vs softmax x sigmoid(lse - s)")
    # the explicit definition: one extra logit per row, its column dropped
    extra = torch.cat([sinks[None, :, None, None].expand(B, H, T, 1), masked], -1)
    _close(p, torch.softmax(extra, -1)[..., 1:], what="sink-logit probabilities")
    assert (p.sum(-1) < 1).all(), "the sink takes some mass from every row"


def test_sink_logit_tends_to_softmax_and_s0_is_softmax_plus_one():
    q, k, v, pad = _inputs()
    soft = softmax_attention(q, k, v, attention_mask=pad, is_causal=True)
    gaps = [(sink_logit_attention(q, k, v, torch.full((H,), s), attention_mask=pad, is_causal=True) - soft).abs().max().item() for s in (-2.0, -8.0, -30.0)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6, f"|sink - softmax| for s = -2, -8, -30: {gaps}"
    # s = 0: softmax + 1 in the denominator
    scores, allowed = _naive_scores(q, k, _naive_allowed(pad, True, T, S))
    e = torch.exp(scores) * allowed
    ref = (e / (1 + e.sum(-1, keepdim=True))) @ v.float().repeat_interleave(2, 1)
    _close(sink_logit_attention(q, k, v, torch.zeros(H), attention_mask=pad, is_causal=True), ref, what="softmax + 1")


def test_sink_logit_has_gradients_for_the_logits():
    q, k, v, _ = _inputs()
    sinks = torch.zeros(H, requires_grad=True)
    sink_logit_attention(q, k, v, sinks, is_causal=True).square().sum().backward()
    assert sinks.grad is not None and sinks.grad.abs().min() > 0


@pytest.mark.parametrize("width", [1, D])
@pytest.mark.parametrize("mask,causal", MASKS)
def test_gated_equals_sdpa_times_gate(mask, causal, width):
    q, k, v, pad = _inputs()
    pad = pad if mask else None
    logits = torch.randn(B, H, T, width)
    allowed = _naive_allowed(pad, causal, T, S)
    bool_mask = allowed[:, :1]
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=bool_mask)
    sdpa = sdpa.masked_fill(~bool_mask.any(-1, keepdim=True), 0)
    out = gated_attention(q, k, v, logits, attention_mask=pad, is_causal=causal)
    _close(out, sdpa * torch.sigmoid(logits), what="gated vs SDPA x gate")


def test_masks_in_every_form_agree():
    q, k, v, pad = _inputs()
    four_d = pad[:, None, None, :].expand(B, 1, T, S)
    additive = torch.zeros(B, 1, T, S).masked_fill(~four_d, torch.finfo(torch.float32).min)
    for fn in (softmax_attention, sigmoid_attention, elu1_attention):
        a = fn(q, k, v, attention_mask=pad)
        _close(fn(q, k, v, attention_mask=four_d), a, what=f"{fn.__name__}: 4-D bool vs 2-D")
        _close(fn(q, k, v, attention_mask=additive), a, what=f"{fn.__name__}: additive vs 2-D")
        _close(fn(q, k, v, attention_mask=pad.long()), a, what=f"{fn.__name__}: int padding vs bool")


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v, _ = _inputs()
    mask = torch.ones(B, 1, T, S, dtype=torch.bool)
    mask[:, :, 1] = False
    for out in (
        softmax_attention(q, k, v, attention_mask=mask),
        sink_logit_attention(q, k, v, torch.zeros(H), attention_mask=mask),
        sigmoid_attention(q, k, v, attention_mask=mask),
        elu1_attention(q, k, v, attention_mask=mask, normalize=True),
    ):
        assert torch.isfinite(out).all() and out[:, :, 1].abs().max() == 0


@pytest.mark.parametrize("fn", ["softmax", "sigmoid", "elu1", "sinklogit", "gated"])
def test_bfloat16_close_to_float32(fn):
    q, k, v, pad = _inputs()
    call = {
        "softmax": lambda *a: softmax_attention(*a, attention_mask=pad, is_causal=True),
        "sigmoid": lambda *a: sigmoid_attention(*a, attention_mask=pad, is_causal=True),
        "elu1": lambda *a: elu1_attention(*a, attention_mask=pad, is_causal=True, normalize=True),
        "sinklogit": lambda *a: sink_logit_attention(*a, torch.zeros(H, dtype=a[0].dtype), attention_mask=pad, is_causal=True),
        "gated": lambda *a: gated_attention(*a, torch.zeros(B, H, T, 1, dtype=a[0].dtype), attention_mask=pad, is_causal=True),
    }[fn]
    full = call(q, k, v)
    half = call(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert half.dtype == torch.bfloat16
    _close(half, full, tol=0.05, what=f"{fn} bf16 vs fp32")


def test_kv_cache_alignment_of_the_causal_mask():
    """With T < S (a cache), query i sees keys up to i + S - T: the last T rows of the full causal result."""
    q, k, v, _ = _inputs(t=S)
    full = sigmoid_attention(q, k, v, is_causal=True, bias=-1.0)
    tail = sigmoid_attention(q[:, :, -3:], k, v, is_causal=True, bias=-1.0)
    _close(tail, full[:, :, -3:], what="causal mask with a cache")
    soft = softmax_attention(q, k, v, is_causal=True)
    _close(softmax_attention(q[:, :, -3:], k, v, is_causal=True), soft[:, :, -3:], what="softmax with a cache")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_matches_cpu():
    q, k, v, pad = _inputs()
    for fn in (softmax_attention, sigmoid_attention, elu1_attention):
        _close(fn(q.cuda(), k.cuda(), v.cuda(), attention_mask=pad.cuda(), is_causal=True).cpu(),
               fn(q, k, v, attention_mask=pad, is_causal=True), tol=1e-4, what=f"{fn.__name__} cuda")
    s = torch.zeros(H)
    _close(sink_logit_attention(q.cuda(), k.cuda(), v.cuda(), s.cuda(), is_causal=True).cpu(),
           sink_logit_attention(q, k, v, s, is_causal=True), tol=1e-4, what="sink logit cuda")
