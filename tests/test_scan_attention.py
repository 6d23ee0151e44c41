"""Query-chunked attention: the model computes what eager attention computes, the metrics match the whole matrices."""

from __future__ import annotations

import pytest
import torch

import sinkless
from conftest import any_tiny_model, tiny_char_tokenizer
from sinkless.adapters import adapter_for, eager_attention
from sinkless.scan.attention import chunked_attention

CAUSAL = ("llama", "qwen3", "mistral", "gemma2", "gpt_oss", "qwen3_next", "gpt_neox", "opt", "phi3")
TEXTS = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w1 w2 w3", "w3 w4 w5 w6"]  # two lengths: right padding in the batch
KEYS = ("first_token_attention", "sink_epsilon", "outlier_attention_share", "learned_sink_attention", "attention_gate", "norm_median")


@pytest.mark.parametrize("family", CAUSAL)
def test_chunked_forward_equals_eager(family):
    """No-op equivalence: chunked attention (3 queries a chunk, padding, sliding windows, sinks) vs eager."""
    model = any_tiny_model(family)
    batch = tiny_char_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), eager_attention(model):
        expected = model(**batch).logits
    with torch.no_grad(), chunked_attention(model, {}, chunk=3):
        got = model(**batch).logits
    real = batch["attention_mask"].bool()
    diff = (got - expected)[real].abs().max()
    print(f"{family}: max |chunked - eager| logits {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", CAUSAL)
def test_chunked_metrics_equal_unchunked(family):
    model = any_tiny_model(family)
    tok = tiny_char_tokenizer()
    plain = sinkless.scan(model, TEXTS, tok, attention=False)
    threshold = 1.001 * sorted(row["norm_median"] for row in plain.layers)[1]  # about half the tokens are "outliers" somewhere (off any token's norm)
    whole = sinkless.scan(model, TEXTS, tok, attention_chunk=None, batch_size=2, threshold=threshold)
    chunked = sinkless.scan(model, TEXTS, tok, attention_chunk=3, batch_size=2, threshold=threshold)
    for a, b in zip(whole.layers, chunked.layers):
        for key in KEYS:
            if a.get(key) is None:
                assert b.get(key) is None, key
            else:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a["layer"])
    assert any(row["outlier_attention_share"] for row in whole.layers), "the share is exercised (threshold forces outliers)"


@pytest.mark.slow
def test_smollm2_first_token_attention_chunked_equals_unchunked(smollm2):
    """Acceptance: the chunked path gives the unchunked path's first-token attention on a short text."""
    text = "The cat sat on the mat. It looked at the door, then at the window, and fell asleep in the sun."
    whole = sinkless.scan(smollm2, text, attention_chunk=None)
    chunked = sinkless.scan(smollm2, text, attention_chunk=5)
    a = [row["first_token_attention"] for row in whole.layers]
    b = [row["first_token_attention"] for row in chunked.layers]
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"SmolLM2 first-token attention, max |chunked - unchunked| over {len(a)} layers: {diff:.2e} (peak {max(a):.3f})")
    assert diff < 1e-5
    assert whole.summary["sink_epsilon"] == pytest.approx(chunked.summary["sink_epsilon"], abs=1e-9)


def test_listener_sees_every_query_once():
    model = any_tiny_model("llama")
    adapter = adapter_for(model)
    module = model.get_submodule(f"{adapter.block(1)}.{adapter.attention}")
    seen = []
    ids = torch.randint(0, 12, (1, 10))
    with torch.no_grad(), chunked_attention(model, {module: lambda probs, start: seen.append((start, probs.shape))}, chunk=4):
        model(input_ids=ids)
    assert [(s, shape[-2]) for s, shape in seen] == [(0, 4), (4, 4), (8, 2)]
    assert [shape[-1] for _, shape in seen] == [4, 8, 10], "causal: later keys are left out of each chunk"
    assert model.config._attn_implementation != "sinkless_chunked", "restored on exit"


# -- what mutation testing found unguarded ----------------------------------------------------------
def _qkv(n_queries=3, n_keys=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 2, n_queries, 16, generator=g), torch.randn(1, 1, n_keys, 16, generator=g),
            torch.randn(1, 1, n_keys, 16, generator=g))


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def test_a_chunk_without_a_mask_is_causal_and_sees_the_cache():
    """No mask from the model: a causal module's queries (after 2 cached keys) see the keys up to their own."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from sinkless.scan.attention import _attention

    model = any_tiny_model("llama")
    module = model.model.layers[0].self_attn
    q, k, v = _qkv()
    allowed = torch.arange(5)[None, :] <= torch.arange(2, 5)[:, None]  # query i sits at position 2 + i
    expected, _ = eager_attention_forward(module, q, k, v, _additive(allowed)[None, None], scaling=module.scaling)
    seen = []
    with chunked_attention(model, {module: lambda probs, start: seen.append((start, probs.shape[-2:]))}, chunk=2):
        got, none = _attention(module, q, k, v, None, scaling=module.scaling)
    torch.testing.assert_close(got, expected)
    assert none is None and seen == [(0, (2, 4)), (2, (1, 5))]
    del module.is_causal  # a module that does not say it is causal: every query sees every key
    expected, _ = eager_attention_forward(module, q, k, v, None, scaling=module.scaling)
    with chunked_attention(model, {}, chunk=2):
        got, _ = _attention(module, q, k, v, None, scaling=module.scaling)
    torch.testing.assert_close(got, expected)


def test_ready_masks_are_sliced_per_chunk_in_the_query_dtype():
    from sinkless.scan.attention import LazyMask, _rows

    allowed = torch.tril(torch.ones(4, 6, dtype=torch.bool), diagonal=2)[None, None]  # (1, 1, 4, 6)
    rows = _rows(allowed, 1, 3, 5, torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and rows.shape == (1, 1, 2, 5)
    assert torch.equal(rows == 0, allowed[:, :, 1:3, :5]) and rows.min() == torch.finfo(torch.bfloat16).min
    additive = _additive(allowed)
    assert torch.equal(_rows(additive, 1, 3, 5, torch.float32), additive[:, :, 1:3, :5])
    assert _rows(None, 0, 2, 5, torch.float32) is None
    from transformers.masking_utils import sdpa_mask

    lazy = LazyMask({"batch_size": 1, "kv_length": 6, "q_length": 4, "q_offset": 2, "device": "cpu"})
    rows = lazy.rows(1, 3, torch.bfloat16)
    expected = sdpa_mask(batch_size=1, q_length=2, kv_length=6, q_offset=3, allow_is_causal_skip=False)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows == 0, expected)


def test_chunked_attention_continues_a_cache():
    """Queries after a KV cache: the lazy mask is offset by the cached length, as eager attention's is."""
    from transformers import DynamicCache

    model = any_tiny_model("llama")
    ids = torch.randint(1, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with eager_attention(model):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
            expected = model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits
        with chunked_attention(model, {}, chunk=2):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
            got = model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_default_chunks_hold_about_chunk_bytes_of_probabilities(monkeypatch):
    from sinkless.scan import attention

    model = any_tiny_model("llama")  # 2 heads
    module = model.get_submodule(f"{adapter_for(model).block(1)}.{adapter_for(model).attention}")
    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 1 * 2 * 10 * 3)  # float32, batch 1, 2 heads, 10 keys: 3 queries a chunk
    seen = []
    with torch.no_grad(), chunked_attention(model, {module: lambda probs, start: seen.append(start)}):
        model(input_ids=torch.randint(0, 12, (1, 10)))
    assert seen == [0, 3, 6, 9]
    monkeypatch.setattr(attention, "CHUNK_BYTES", 1)  # less than one query's probabilities: one query a chunk
    seen.clear()
    with torch.no_grad(), chunked_attention(model, {module: lambda probs, start: seen.append(start)}):
        model(input_ids=torch.randint(0, 12, (1, 4)))
    assert seen == [0, 1, 2, 3]


def test_only_families_with_an_eager_function_are_chunked(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from sinkless.scan.attention import IMPLEMENTATION, _attention, _lazy_mask, supports_chunking

    model = any_tiny_model("llama")
    modules = [layer.self_attn for layer in model.model.layers]
    assert supports_chunking(model, modules) and not supports_chunking(model, [])
    assert not supports_chunking(model, [*modules, torch.nn.Linear(2, 2)])  # torch's own module: no eager function
    with pytest.raises(RuntimeError) as error:
        _attention(torch.nn.Linear(2, 2), *_qkv(), None)
    assert str(error.value) == "Linear has no eager attention function to chunk"
    # the implementation registers itself on first use (a fresh process has neither entry)
    for interface in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.delitem(interface._global_mapping, IMPLEMENTATION, raising=False)
    batch = tiny_char_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), eager_attention(model):
        expected = model(**batch).logits
    with torch.no_grad(), chunked_attention(model, {}, chunk=3):
        got = model(**batch).logits
    assert AttentionInterface._global_mapping[IMPLEMENTATION] is _attention
    assert AttentionMaskInterface._global_mapping[IMPLEMENTATION] is _lazy_mask  # masks stay lazy: no n x n tensor
    real = batch["attention_mask"].bool()
    assert (got - expected)[real].abs().max() < 1e-4


def test_masks_are_built_on_the_attention_tensors_device():
    """Every chunk's mask (a ready bool mask made additive, a lazy mask's rows, the causal rows of a call with no
    mask) lives on the device of the tensors it is added to ('meta' stands in for a GPU: shapes, no values)."""
    from sinkless.scan.attention import LazyMask, _attention, _rows

    allowed = torch.tril(torch.ones(1, 1, 4, 6, dtype=torch.bool), diagonal=2).to("meta")
    rows = _rows(allowed, 1, 3, 5, torch.float32)
    assert rows.device.type == "meta" and rows.shape == (1, 1, 2, 5)
    lazy = LazyMask({"batch_size": 1, "kv_length": 6, "q_length": 4, "q_offset": 2, "device": torch.device("meta")})
    rows = lazy.rows(1, 3, torch.float32)
    assert rows.device.type == "meta" and rows.shape == (1, 1, 2, 6)
    model = any_tiny_model("llama")
    module = model.model.layers[0].self_attn
    q, k, v = (t.to("meta") for t in _qkv())
    with chunked_attention(model, {}, chunk=2):
        out, _ = _attention(module, q, k, v, None, scaling=module.scaling)
    assert out.device.type == "meta" and out.shape == (1, 3, 2, 16)


def test_causal_rows_follow_the_query_dtype():
    """No mask from the model, float64 (or bf16) queries: the causal rows are built in the query's dtype, so the
    chunked call equals eager attention with a mask of that dtype."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from sinkless.scan.attention import _attention

    model = any_tiny_model("llama")
    module = model.model.layers[0].self_attn
    allowed = torch.arange(5)[None, :] <= torch.arange(2, 5)[:, None]  # 3 queries after 2 cached keys
    for dtype in (torch.float64, torch.bfloat16):
        q, k, v = (t.to(dtype) for t in _qkv(seed=1))
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
        expected, _ = eager_attention_forward(module, q, k, v, mask, scaling=module.scaling)
        with chunked_attention(model, {}, chunk=2):
            got, _ = _attention(module, q, k, v, None, scaling=module.scaling)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
