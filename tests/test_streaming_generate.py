"""SinkCache inside transformers' own ``model.generate()``: every rotary family, padded batches (each row its
own stream), generation options, and the structural model check."""

from __future__ import annotations

import pytest
import torch

from sinkless.errors import SinklessError
from sinkless.streaming import SinkCache, check_streamable

from test_streaming import FAMILIES, assert_close, ids_for, masked_reference, tiny_lm

GREEDY = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def run(model, ids, cache=None, **kwargs):
    """``generate`` -> (generated tokens ``(B, new)``, their logits ``(B, new, V)``)."""
    out = model.generate(ids, past_key_values=cache, **{**GREEDY, **kwargs})
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_sink_cache_per_family(family):
    """Before the first eviction: the same tokens and logits as generate with the default cache. After
    evictions: the logits of the exact StreamingLLM reference (one masked forward over the generated text)."""
    model = tiny_lm(family)
    ids = ids_for(7, seed=2)
    plain_tokens, plain_logits = run(model, ids, max_new_tokens=12)
    tokens, logits = run(model, ids, SinkCache(model, sinks=4, window=16), max_new_tokens=12)  # holds 20 >= 19
    assert torch.equal(tokens, plain_tokens), f"{family}: {tokens.tolist()} vs {plain_tokens.tolist()}"
    assert_close(logits, plain_logits, f"{family}: generate with SinkCache before eviction vs default cache", atol=1e-4)

    sinks, window, new = 2, 5, 25
    cache = SinkCache(model, sinks=sinks, window=window)
    tokens, logits = run(model, ids, cache, max_new_tokens=new)
    assert cache.seen() == [7 + new - 1] and cache.kept() == [sinks + window] and cache.rebases > 0
    text = torch.cat([ids, tokens], 1)
    reference = masked_reference(model, text, sinks, window)[:, ids.shape[1] - 1 : -1]  # logits predicting each new token
    assert_close(logits, reference, f"{family}: generate with SinkCache after evictions vs masked reference", atol=1e-4)
    assert torch.equal(tokens, logits.argmax(-1))


def _padded(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_separate_runs(family, side):
    """A padded batch of 3 prompts of different lengths = the 3 prompts generated alone: each row is its own
    stream (sinks = its first real tokens, its own positions), through evictions and rebases."""
    model = tiny_lm(family)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 63, (n,), generator=g) for n in (5, 11, 17)]
    alone = [run(model, p[None], SinkCache(model, sinks=2, window=6), max_new_tokens=15) for p in prompts]
    ids, mask = _padded(prompts, side)
    cache = SinkCache(model, sinks=2, window=6)
    tokens, logits = run(model, ids, cache, attention_mask=mask, max_new_tokens=15)
    worst = 0.0
    for row, (solo_tokens, solo_logits) in enumerate(alone):
        assert torch.equal(tokens[row], solo_tokens[0]), f"row {row}: {tokens[row].tolist()} vs {solo_tokens[0].tolist()}"
        worst = max(worst, (logits[row] - solo_logits[0]).abs().max().item())
    print(f"{family} {side}-padded batch of 3 vs 3 separate runs: identical tokens, logits max |diff| = {worst:.3g}")
    assert worst <= 1e-5
    assert cache.seen() == [n + 14 for n in (5, 11, 17)] and cache.kept() == [8, 8, 8]
    chunked = model.generate(ids, attention_mask=mask, past_key_values=SinkCache(model, sinks=2, window=6), max_new_tokens=15,
                             do_sample=False, pad_token_id=0, prefill_chunk_size=4)  # transformers' own chunked prefill
    assert torch.equal(chunked[:, ids.shape[1] :], tokens)


def test_sampling_options_match_the_default_cache_before_eviction():
    """Sampling with top-k/top-p/temperature/repetition penalty, stopping criteria and a streamer go through
    generate unchanged: with the same seed, the same tokens as the default cache while nothing is evicted."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 16, dtype=torch.bool)

    class Collect:
        def __init__(self):
            self.pieces = []

        def put(self, value):
            self.pieces.append(value.tolist())

        def end(self):
            self.pieces.append("end")

    model = tiny_lm("qwen3")
    ids = ids_for(6, batch=2, seed=3)
    options = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=20,
                   stopping_criteria=StoppingCriteriaList([StopAfter()]), pad_token_id=0)
    runs = []
    for cache in (None, SinkCache(model, sinks=4, window=20)):
        torch.manual_seed(7)
        streamer = Collect()
        runs.append((model.generate(ids, past_key_values=cache, streamer=streamer, **options), streamer.pieces))
    assert runs[0][0].shape[1] == 16 and torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[1][1][-1] == "end"


def test_beam_search_and_several_returned_sequences():
    model = tiny_lm("llama")
    ids = ids_for(6, seed=4)
    for options in (dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=3)):
        outs = []
        for cache in (None, SinkCache(model, sinks=4, window=30)):
            torch.manual_seed(0)
            outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=10, pad_token_id=0, **options))
        assert torch.equal(outs[0], outs[1]), options
    cache = SinkCache(model, sinks=2, window=3)  # beams past the window: every beam keeps sinks + window
    model.generate(ids, past_key_values=cache, max_new_tokens=12, num_beams=2, pad_token_id=0)
    assert cache.kept() == [5, 5]


def test_a_continued_conversation_equals_one_stream():
    """generate(full ids, same cache) feeds only the new tokens: two calls equal one stream of all tokens."""
    model = tiny_lm("llama")
    cache = SinkCache(model, sinks=2, window=5)
    first = model.generate(ids_for(8, seed=5), past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    more = torch.cat([first, ids_for(4, seed=6)], 1)
    second = model.generate(more, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert cache.seen() == [second.shape[1] - 1]
    with torch.no_grad():
        reference = masked_reference(model, second[:, :-1], 2, 5)
    assert torch.equal(second[0, more.shape[1] :], reference[0, more.shape[1] - 1 :].argmax(-1))


# -- the model check ------------------------------------------------------------------------------
def test_structural_model_check():
    """Gemma3's per-layer-type rotary buffers are found (local and global bases differ), partial rotary is
    handled, and a model that builds a rotary module but uses ALiBi is refused with the reason."""
    import transformers as T

    spec = check_streamable(tiny_lm("gemma3"), 2, 5)
    assert spec.layer_types[:2] == ("sliding_attention", "full_attention") and spec.sliding[:2] == (4, None)
    assert not torch.equal(spec.inv_freq[0], spec.inv_freq[1]), "Gemma3's local and global layers share one rope base?"
    partial = check_streamable(tiny_lm("phi3_partial"), 2, 5)
    assert 2 * partial.inv_freq[0].numel() == 8  # half of the 16 head dims rotate
    model = tiny_lm("phi3_partial")
    ids = ids_for(20, seed=8)
    streamed = torch.cat([model(ids[:, i : i + 1], past_key_values=c).logits for c in [SinkCache(model, sinks=2, window=5)] for i in range(20)], 1)
    assert_close(streamed, masked_reference(model, ids, 2, 5), "partial rotary (Phi3, factor 0.5) vs masked reference")
    sliding = tiny_lm("mistral_sliding")  # every layer slides over 5 tokens, narrower than the kept 8
    ids = ids_for(24, seed=9)
    streamed = torch.cat([sliding(ids[:, i : i + 3], past_key_values=c).logits for c in [SinkCache(sliding, sinks=2, window=6)] for i in range(0, 24, 3)], 1)
    assert_close(streamed, masked_reference(sliding, ids, 2, 6), "Mistral sliding window 5 vs masked reference")
    torch.manual_seed(0)
    alibi = T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64, alibi=True)).eval()
    with pytest.raises(SinklessError, match="do not rotate"):
        check_streamable(alibi, 4, 8)
    flash = tiny_lm("llama")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(SinklessError, match="sdpa or eager"):
        check_streamable(flash, 4, 8)


def test_rope_scaling_that_depends_on_length_is_refused():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(SinklessError, match="dynamic"):
        check_streamable(T.LlamaForCausalLM(config).eval(), 4, 8)


def test_a_reused_cache_given_a_prompt_that_does_not_continue_it():
    model = tiny_lm("llama")
    cache = SinkCache(model, sinks=2, window=6)
    model.generate(ids_for(9, seed=1), attention_mask=torch.ones(1, 9, dtype=torch.long), past_key_values=cache, max_new_tokens=3,
                   do_sample=False, pad_token_id=0)
    with pytest.raises(SinklessError, match="does not continue what the SinkCache has seen"):
        model.generate(ids_for(2, seed=2), attention_mask=torch.ones(1, 2, dtype=torch.long), past_key_values=cache, max_new_tokens=3,
                       do_sample=False, pad_token_id=0)
