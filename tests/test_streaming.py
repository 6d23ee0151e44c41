"""StreamingLLM sink + window cache: exactness against fresh forwards, chunked prefill, batches, errors."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sinkless.errors import SinklessError
from sinkless.streaming import SinkCache, streaming_forward
from sinkless.streaming.generate import Sampling, generate_tokens

from conftest import tiny_model

ROTARY = ("llama", "qwen3", "mistral")


def tiny_lm(family: str, *, layers: int = 3, attn: str = "sdpa"):
    """A tiny random rotary causal LM (conftest's, plus Mistral), vocabulary 64."""
    import transformers as T

    if family == "mistral":
        torch.manual_seed(0)
        config = T.MistralConfig(
            hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, vocab_size=64, sliding_window=None,
        )
        model = T.MistralForCausalLM(config).eval()
    elif layers == 3:
        model = tiny_model(family)
    else:
        torch.manual_seed(0)
        cls, cfg = {"llama": (T.LlamaForCausalLM, T.LlamaConfig), "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config)}[family]
        extra = {"head_dim": 16} if family == "qwen3" else {}
        model = cls(cfg(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64, vocab_size=64, **extra)).eval()
    model.set_attn_implementation(attn)
    return model


def ids_for(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def stream_logits(model, ids: torch.Tensor, sinks: int, window: int, chunk: int = 1) -> tuple[torch.Tensor, SinkCache]:
    """Logits ``(B, N, V)`` of feeding ``ids`` through a fresh SinkCache in chunks."""
    cache = SinkCache(model, sinks=sinks, window=window)
    out = []
    for i in range(0, ids.shape[1], chunk):
        out.append(streaming_forward(model, cache, ids[:, i : i + chunk]).logits)
        assert cache.get_seq_length() <= sinks + window - 1, "the cache holds more than sinks + window - 1 between steps"
    return torch.cat(out, dim=1), cache


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    diff = (actual - expected).abs().max().item()
    print(f"{what}: max |diff| = {diff:.3g}")
    assert diff <= atol, f"{what}: max |diff| = {diff:.3g} > {atol}"


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ROTARY)
@pytest.mark.parametrize("sinks,window", [(2, 6), (0, 5), (4, 4 + 3)])
def test_every_step_equals_fresh_forward_over_kept_tokens(family, sinks, window):
    """The issue's exactness test, at every step: a fresh forward over exactly the kept tokens, at positions
    0..len-1, gives the streaming logits. Exact for a one-layer model, whose cached keys/values depend only
    on the token and its (in-cache) position; with more layers the cached states also carry the evicted
    context (the point of StreamingLLM), so deeper models are checked against the masked reference below."""
    model = tiny_lm(family, layers=1)
    ids = ids_for(40)
    streamed, cache = stream_logits(model, ids, sinks, window)
    assert cache.rebases > 0 and cache.seen == 40
    fresh = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            kept = cache.kept_positions(t)
            assert len(kept) == min(t + 1, sinks + window)
            fresh.append(model(ids[:, kept]).logits[:, -1])  # positions 0..len-1
    assert_close(streamed, torch.stack(fresh, dim=1), f"{family} S={sinks} W={window} streaming vs fresh forward over kept tokens")


def masked_reference(model, ids: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """StreamingLLM computed independently of SinkCache: one plain forward over the whole text, each query
    limited to the sinks and its last ``window`` tokens by a 4D mask. Rotary attention sees only position
    differences, so window distances are text distances; the sinks must sit at in-cache distance
    ``S + W - 1 - i``, which a query past the first window gets from its own copy of the sink tokens
    (placed at positions ``t - (S + W - 1) + i``; a copy's states equal the originals')."""
    n = ids.shape[1]
    tokens, positions, owner, text_pos = [], [], [], []  # owner: which query a sink copy belongs to (-1: text)
    for t in range(n):
        if sinks and t >= sinks + window:
            shift = t - (sinks + window - 1)
            tokens += ids[0, :sinks].tolist()
            positions += [shift + i for i in range(sinks)]
            owner += [t] * sinks
            text_pos += list(range(sinks))
        tokens.append(int(ids[0, t]))
        positions.append(t)
        owner.append(-1)
        text_pos.append(t)
    size = len(tokens)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        for k in range(q + 1):
            if owner[q] >= 0:  # a sink copy: causal within its own copy
                mask[q, k] = owner[k] == owner[q]
            elif owner[k] >= 0:  # a text query sees only its own sink copy
                mask[q, k] = owner[k] == text_pos[q]
            else:
                t, u = text_pos[q], text_pos[k]
                full = sinks and t >= sinks + window
                mask[q, k] = (u < sinks and not full) or (max(sinks, t - window + 1) <= u <= t)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), attention_mask=mask[None, None]
        ).logits[0]
    return logits[torch.tensor(owner) < 0][None]  # (1, N, V): the text tokens


@pytest.mark.parametrize("family", ROTARY)
@pytest.mark.parametrize("sinks,window", [(2, 6), (0, 6), (1, 3)])
def test_every_step_equals_masked_reference(family, sinks, window):
    """Deep models: token-by-token streaming equals the independently masked full forward at every step."""
    model = tiny_lm(family)
    ids = ids_for(36, seed=1)
    streamed, cache = stream_logits(model, ids, sinks, window)
    assert cache.rebases > 0
    assert_close(streamed, masked_reference(model, ids, sinks, window), f"{family} S={sinks} W={window} streaming vs masked reference")


@pytest.mark.parametrize("family", ROTARY)
def test_before_eviction_equals_plain_model(family):
    model = tiny_lm(family)
    ids = ids_for(10, batch=2)
    streamed, _ = stream_logits(model, ids, sinks=4, window=6)
    with torch.no_grad():
        plain = model(ids).logits
    assert_close(streamed, plain, f"{family} streaming before any eviction vs plain forward")
    evicted, _ = stream_logits(model, ids_for(16, batch=2), sinks=2, window=4)
    with torch.no_grad():
        plain16 = model(ids_for(16, batch=2)).logits
    gap = (evicted[:, 6:] - plain16[:, 6:]).abs().max().item()
    print(f"after eviction the streaming logits differ from the full context by {gap:.3g}")
    assert gap > 1e-3, "evicted tokens had no effect: is the cache evicting at all?"


def test_eager_attention_gives_the_same_logits():
    ids = ids_for(30)
    sdpa, _ = stream_logits(tiny_lm("llama", attn="sdpa"), ids, 2, 6, chunk=4)
    eager, _ = stream_logits(tiny_lm("llama", attn="eager"), ids, 2, 6, chunk=4)
    assert_close(eager, sdpa, "eager vs sdpa mask format")


# -- chunked prefill ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ROTARY)
@pytest.mark.parametrize("chunk", [3, 40])
def test_chunked_prefill_equals_token_by_token(family, chunk):
    """A prompt much longer than the window, fed in chunks (even all at once), is windowed from its first
    token: same logits and same kept keys/values as feeding it token by token."""
    model = tiny_lm(family)
    ids = ids_for(40, batch=2, seed=3)
    one, cache_one = stream_logits(model, ids, 2, 6, chunk=1)
    many, cache_many = stream_logits(model, ids, 2, 6, chunk=chunk)
    assert_close(many, one, f"{family} chunk {chunk} vs token by token")
    assert cache_many.get_seq_length() == cache_one.get_seq_length() == 2 + 6 - 1
    with torch.no_grad():  # what comes next sees the same cache
        nxt = ids_for(1, batch=2, seed=9)
        assert_close(
            streaming_forward(model, cache_many, nxt).logits, streaming_forward(model, cache_one, nxt).logits,
            f"{family} chunk {chunk}: next token after the prefill",
        )


def test_generation_after_long_prompt_matches_token_by_token_prefill():
    model = tiny_lm("llama")
    prompt = ids_for(40, seed=4)[0]
    runs = []
    for chunk in (1, 16):
        cache = SinkCache(model, sinks=2, window=8)
        runs.append(list(generate_tokens(model, cache, prompt, Sampling(max_new_tokens=12, chunk_size=chunk))))
        assert cache.seen == 40 + 11 and cache.get_seq_length() == 2 + 8 - 1
    print("generated", runs[0])
    assert runs[0] == runs[1]


# -- perplexity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "window", "sink", "recompute"])
def test_ppl_batch_streams_equal_separate_runs(mode):
    from sinkless.streaming.ppl import PplConfig, perplexity

    model = tiny_lm("qwen3")
    tokens = ids_for(61, seed=5)[0]
    batched = perplexity(model, tokens, PplConfig(mode=mode, window=6, batch_size=2, chunk_size=5), progress=False)
    halves = [
        perplexity(model, tokens[i * 30 : i * 30 + 31], PplConfig(mode=mode, window=6, chunk_size=7), progress=False)
        for i in range(2)
    ]
    separate = torch.tensor(halves[0].nll_curve + halves[1].nll_curve)
    assert batched.tokens == 60 == len(batched.nll_curve)
    assert_close(torch.tensor(batched.nll_curve), separate, f"{mode}: batch of 2 streams vs 2 runs", atol=1e-3)


def test_ppl_chunks_identical_and_recompute_is_fresh_forward():
    from sinkless.streaming.ppl import PplConfig, perplexity

    model = tiny_lm("llama")
    tokens = ids_for(45, seed=6)[0]
    one = perplexity(model, tokens, PplConfig(mode="sink", sinks=2, window=6, chunk_size=1), progress=False)
    big = perplexity(model, tokens, PplConfig(mode="sink", sinks=2, window=6, chunk_size=16), progress=False)
    assert_close(torch.tensor(big.nll_curve), torch.tensor(one.nll_curve), "sink ppl: chunk 16 vs 1", atol=1e-4)
    rec = perplexity(model, tokens, PplConfig(mode="recompute", sinks=2, window=6, chunk_size=4), progress=False)
    manual = []
    with torch.no_grad():
        for j in range(44):
            kept = list(range(min(2, j + 1))) + list(range(max(2, j - 5), j + 1))
            logits = model(tokens[kept][None]).logits[0, -1]
            manual.append(float(torch.nn.functional.cross_entropy(logits[None], tokens[j + 1][None])))
    assert_close(torch.tensor(rec.nll_curve), torch.tensor(manual), "recompute vs a fresh forward per token", atol=1e-4)
    sparse = perplexity(model, tokens, PplConfig(mode="recompute", sinks=2, window=6, every=5), progress=False)
    assert sparse.scored_positions == list(range(0, 44, 5))
    assert_close(torch.tensor(sparse.nll_curve), torch.tensor(manual[::5]), "recompute --every 5", atol=1e-4)


def test_intervention_wraps_the_run():
    from sinkless.streaming.ppl import PplConfig, perplexity

    events = []

    @contextlib.contextmanager
    def spy(model):
        events.append(("enter", type(model).__name__))
        try:
            yield
        finally:
            events.append(("exit", None))

    model = tiny_lm("llama")
    perplexity(model, ids_for(20)[0], PplConfig(mode="sink", sinks=1, window=4), intervention=spy, progress=False)
    assert events == [("enter", "LlamaForCausalLM"), ("exit", None)]


# -- errors ---------------------------------------------------------------------------------------
def test_absolute_position_model_is_refused():
    with pytest.raises(SinklessError, match="no rotary position embeddings"):
        SinkCache(tiny_model("gpt2"), sinks=4, window=8)


@pytest.mark.parametrize("sinks,window", [(4, 4), (4, 2), (-1, 8), (0, 0)])
def test_bad_sizes_are_refused(sinks, window):
    with pytest.raises(SinklessError):
        SinkCache(tiny_lm("llama"), sinks=sinks, window=window)


def test_window_mode_with_sinks_and_bad_flags_are_refused():
    from sinkless.streaming.ppl import PplConfig

    with pytest.raises(SinklessError, match="window keeps no sinks"):
        PplConfig(mode="window", sinks=4).resolved()
    with pytest.raises(SinklessError, match="--every"):
        PplConfig(mode="sink", every=4).resolved()


def test_forward_without_step_inputs_is_an_error():
    model = tiny_lm("llama")
    cache = SinkCache(model, sinks=2, window=4)
    with pytest.raises(RuntimeError, match="step_inputs"), torch.no_grad():
        model(input_ids=ids_for(3), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ppl", "--model", "smollm2-135m", "--mode", "sink", "--sinks", "8", "--window", "8"], "must be larger"),
        (["ppl", "--model", "smollm2-135m", "--mode", "sink", "--text", "/no/such/file.txt"], "does not exist"),
        (["ppl", "--model", "smollm2-135m", "--mode", "window", "--sinks", "4"], "keeps no sinks"),
        (["stream", "--model", "smollm2-135m", "--sinks", "4", "--window", "3", "--prompt", "x"], "must be larger"),
    ],
)
def test_cli_user_mistakes_exit_2(argv, message, capsys):
    from sinkless.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


# -- the cache's bookkeeping, by hand -----------------------------------------------------------------
def test_kept_and_in_cache_positions():
    cache = SinkCache(tiny_lm("llama"), sinks=2, window=4)
    assert cache.kept_positions(0) == [0] and cache.kept_positions(1) == [0, 1]
    assert cache.kept_positions(3) == [0, 1, 2, 3]
    assert cache.kept_positions(5) == [0, 1, 2, 3, 4, 5]
    assert cache.kept_positions(6) == [0, 1, 3, 4, 5, 6]  # the last 4 (3..6) after the 2 sinks
    assert cache.kept_positions(9) == [0, 1, 6, 7, 8, 9]
    assert cache.in_cache_position(torch.tensor([0, 4, 5, 6, 50])).tolist() == [0, 4, 5, 5, 5]
    no_sinks = SinkCache(tiny_lm("llama"), sinks=0, window=3)
    assert no_sinks.kept_positions(7) == [5, 6, 7] and no_sinks.kept_positions(1) == [0, 1]


def test_cache_between_steps_holds_sinks_and_window_minus_one():
    model = tiny_lm("llama")
    _, cache = stream_logits(model, ids_for(11), sinks=2, window=4)
    assert cache.seen == 11 and cache.get_seq_length() == 2 + 4 - 1
    assert cache.window_start == 11 - 4 + 1
    assert repr(cache) == "SinkCache(sinks=2, window=4, seen=11, kept=5)"
    assert cache.layers[0].get_max_length() == 6 and cache.layers[0].get_mask_sizes(3) == (8, 0)
    cache.reset()
    assert (cache.seen, cache.get_seq_length(), cache.frame, cache.rebases, cache.window_start) == (0, 0, 0, 0, 2)
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(1)


def test_step_inputs_positions_and_mask_before_eviction():
    cache = SinkCache(tiny_lm("llama"), sinks=2, window=4)
    inputs = cache.step_inputs(3, batch_size=2)
    assert inputs["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert inputs["attention_mask"].shape == (1, 1, 3, 3) and inputs["attention_mask"].dtype == torch.bool
    assert inputs["attention_mask"][0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    with pytest.raises(RuntimeError, match="was not followed by a forward"):
        cache.step_inputs(1)
    fresh = SinkCache(tiny_lm("llama"), sinks=2, window=4)
    with pytest.raises(ValueError, match="n_new must be >= 1"):
        fresh.step_inputs(0)


def test_eager_mask_is_additive():
    cache = SinkCache(tiny_lm("llama", attn="eager"), sinks=1, window=2)
    mask = cache.step_inputs(2)["attention_mask"][0, 0]
    assert mask.dtype == torch.float32 and mask[0, 0] == 0 and mask[1, 0] == 0 and mask[1, 1] == 0
    assert mask[0, 1] == torch.finfo(torch.float32).min


@pytest.mark.parametrize(
    "sinks, window, message",
    [
        (-1, 8, "bad cache size: sinks=-1, window=8\n  fix: use --sinks >= 0 and --window >= 1"),
        (0, 0, "bad cache size: sinks=0, window=0\n  fix: use --sinks >= 0 and --window >= 1"),
        (4, 4, "window (4) must be larger than the number of sinks (4)\n  fix: the window holds the recent tokens; the paper uses --sinks 4 --window 1020"),
    ],
)
def test_bad_sizes_messages(sinks, window, message):
    with pytest.raises(SinklessError) as error:
        SinkCache(tiny_lm("llama"), sinks=sinks, window=window)
    assert str(error.value) == message


def test_models_that_cannot_stream_are_named():
    from sinkless.streaming import check_streamable
    from sinkless.streaming.cache import rotary_inv_freq

    with pytest.raises(SinklessError, match="BertModel is not a causal language model"):
        check_streamable(tiny_model("bert"), 2, 4)
    with pytest.raises(SinklessError, match="GPT2LMHeadModel has no rotary position embeddings"):
        rotary_inv_freq(tiny_model("gpt2"))
    model = tiny_lm("llama")
    model.config.rope_parameters = {**(model.config.rope_parameters or {}), "rope_type": "dynamic"}
    with pytest.raises(SinklessError, match="uses 'dynamic' rotary scaling") as error:
        rotary_inv_freq(model)
    assert "default, linear, llama3, yarn" in error.value.fix
    sliding = tiny_lm("mistral")
    sliding.config.sliding_window = 5
    with pytest.raises(SinklessError, match="sliding window of 5 tokens, smaller than sinks \\+ window \\(6\\)"):
        check_streamable(sliding, 2, 4)
    assert check_streamable(sliding, 1, 4) is not None  # 5 <= 5: fine
    flash = tiny_lm("llama")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(SinklessError, match="needs sdpa or eager attention, and the model uses 'flash_attention_2'"):
        check_streamable(flash, 2, 4)
    inv = rotary_inv_freq(tiny_lm("llama"))
    assert inv.shape == (8,) and inv.dtype == torch.float32 and float(inv[0]) == 1.0
