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
