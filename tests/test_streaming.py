"""StreamingLLM sink + window cache: exactness against fresh forwards and an independent masked reference,
the paper's counting, chunked prefill, atomic steps, the model left as it was, errors; streaming perplexity."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from sinkless.errors import SinklessError
from sinkless.streaming import SinkCache

ROTARY = ("llama", "qwen3", "mistral")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt_oss", "falcon")


def tiny_lm(family: str, *, layers: int = 3, attn: str | None = None, **extra):
    """A tiny random causal LM of ``family`` (vocabulary 64), built in memory."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    alternating = {"layer_types": (["sliding_attention", "full_attention"] * layers)[:layers], "sliding_window": 4}
    builders = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**common)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**common, head_dim=16)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=None)),
        "mistral_sliding": lambda: T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=5)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**common, head_dim=16)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**common, head_dim=16, **alternating)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common, head_dim=16, **alternating)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**common)),
        "phi3_partial": lambda: T.Phi3ForCausalLM(T.Phi3Config(**common, partial_rotary_factor=0.5)),
        "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(**common, head_dim=16, num_local_experts=2, num_experts_per_tok=1, **alternating)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(**{k: v for k, v in common.items() if k != "intermediate_size"},
                                                            alibi=False, new_decoder_architecture=True, num_kv_heads=1)),
    }
    model = builders[family]().eval()
    if attn:
        model.set_attn_implementation(attn)
    return model


def ids_for(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 63, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def stream_logits(model, ids: torch.Tensor, sinks: int, window: int, chunk: int = 1, **cache_kw) -> tuple[torch.Tensor, SinkCache]:
    """Logits ``(B, N, V)`` of feeding ``ids`` through a fresh SinkCache, ``chunk`` tokens per call."""
    cache = SinkCache(model, sinks=sinks, window=window, **cache_kw)
    out = []
    for i in range(0, ids.shape[1], chunk):
        out.append(model(input_ids=ids[:, i : i + chunk], past_key_values=cache).logits)
        assert max(cache.kept()) <= sinks + window, "the cache holds more than sinks + window between steps"
    return torch.cat(out, dim=1), cache


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    diff = (actual - expected).abs().max().item()
    print(f"{what}: max |diff| = {diff:.3g}")
    assert diff <= atol, f"{what}: max |diff| = {diff:.3g} > {atol}"


def _sliding_windows(model) -> dict[str, int | None]:
    """Mask key -> sliding window, from the config (as the model itself reads it)."""
    config = model.config
    types = getattr(config, "layer_types", None)
    if types:
        return {t: (config.sliding_window if t == "sliding_attention" else None) for t in set(types)}
    return {"": getattr(config, "sliding_window", None)}


@torch.no_grad()
def masked_reference(model, ids: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """StreamingLLM computed independently of SinkCache: one plain forward over the whole text, each query
    limited by a 4D mask to the sinks, the ``window`` tokens before it and itself (the paper's counting).
    Rotary attention sees only position differences, so window distances are text distances; a query past
    the first ``S + W`` tokens sees the sinks at in-cache distance ``S + W - i`` through its own copy of the
    sink tokens (at positions ``t - (S + W) + i``; a copy's states equal the originals'). Sliding-window
    layers also drop keys at in-cache distance >= their window, as a fresh forward over the kept tokens would."""
    s, w = sinks, window
    n = ids.shape[1]
    tokens, positions, owner, text_pos = [], [], [], []  # owner: the query a sink copy belongs to (-1: text)
    for t in range(n):
        if s and t > s + w:
            tokens += ids[0, :s].tolist()
            positions += [t - (s + w) + i for i in range(s)]
            owner += [t] * s
            text_pos += list(range(s))
        tokens.append(int(ids[0, t]))
        positions.append(t)
        owner.append(-1)
        text_pos.append(t)
    size = len(tokens)
    visible = torch.zeros(size, size, dtype=torch.bool)
    distance = torch.zeros(size, size, dtype=torch.long)
    for q in range(size):
        for k in range(q + 1):
            if owner[q] >= 0:  # a sink copy: causal within its own copy
                visible[q, k] = owner[k] == owner[q]
            elif owner[k] >= 0:  # a text query sees only its own sink copy
                visible[q, k] = owner[k] == text_pos[q]
            else:
                t, u = text_pos[q], text_pos[k]
                copied = s and t > s + w
                visible[q, k] = (u < s and not copied) or (max(s, t - w) <= u <= t)
            distance[q, k] = positions[q] - positions[k]
    masks = {}
    for key, sliding in _sliding_windows(model).items():
        seen = visible & (distance < sliding) if sliding else visible
        mask = seen[None, None]
        if model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        masks[key] = mask
    mask = masks[""] if "" in masks else masks
    logits = model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), attention_mask=mask).logits[0]
    return logits[torch.tensor(owner) < 0][None]  # (1, N, V): the text tokens


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ROTARY)
@pytest.mark.parametrize("sinks,window", [(2, 5), (0, 5), (4, 3)])
def test_every_step_equals_fresh_forward_over_kept_tokens(family, sinks, window):
    """At every step, a fresh forward over exactly the kept tokens at positions 0..len-1 gives the streaming
    logits. Exact for a one-layer model, whose cached keys/values depend only on the token and its (in-cache)
    position; deeper models are checked against the masked reference below."""
    model = tiny_lm(family, layers=1)
    ids = ids_for(40)
    for chunk in (1, 7):
        streamed, cache = stream_logits(model, ids, sinks, window, chunk=chunk)
        assert cache.rebases > 0 and cache.seen() == [40]
        fresh = []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                kept = cache.kept_positions(t)
                assert len(kept) == min(t + 1, sinks + window + 1)
                fresh.append(model(ids[:, kept]).logits[:, -1])  # positions 0..len-1
        assert_close(streamed, torch.stack(fresh, dim=1), f"{family} S={sinks} W={window} chunk {chunk}: streaming vs fresh forward over kept tokens")


@pytest.mark.parametrize("family", ROTARY)
@pytest.mark.parametrize("sinks,window", [(2, 5), (0, 6), (1, 2)])
def test_every_step_equals_masked_reference(family, sinks, window):
    """Deep models: token-by-token streaming equals the independently masked full forward at every step."""
    model = tiny_lm(family)
    ids = ids_for(36, seed=1)
    streamed, cache = stream_logits(model, ids, sinks, window)
    assert cache.rebases > 0
    assert_close(streamed, masked_reference(model, ids, sinks, window), f"{family} S={sinks} W={window} streaming vs masked reference")


def test_the_paper_counting():
    """--sinks 4 --window 1020 (here 2 + 6): the cache holds S + W tokens between steps, each new token attends
    to S + W + 1, itself included."""
    model = tiny_lm("llama")
    _, cache = stream_logits(model, ids_for(30), 2, 6, chunk=4)
    assert cache.kept() == [8] and cache.capacity == 8
    assert cache.kept_positions(29) == [0, 1, *range(23, 30)]


@pytest.mark.parametrize("family", ROTARY)
def test_before_eviction_equals_plain_model(family):
    model = tiny_lm(family)
    ids = ids_for(10, batch=2)
    streamed, _ = stream_logits(model, ids, sinks=4, window=6)
    with torch.no_grad():
        plain = model(ids).logits
    assert_close(streamed, plain, f"{family} streaming before any eviction vs plain forward")
    evicted, _ = stream_logits(model, ids_for(16, batch=2), sinks=2, window=3)
    with torch.no_grad():
        plain16 = model(ids_for(16, batch=2)).logits
    gap = (evicted[:, 6:] - plain16[:, 6:]).abs().max().item()
    print(f"after eviction the streaming logits differ from the full context by {gap:.3g}")
    assert gap > 1e-3, "evicted tokens had no effect: is the cache evicting at all?"


@pytest.mark.parametrize("chunk", [1, 4])
def test_eager_attention_gives_the_same_logits(chunk):
    """Both mask formats, including one-token steps that hand the model no mask once every slot is visible."""
    ids = ids_for(30)
    sdpa, _ = stream_logits(tiny_lm("llama", attn="sdpa"), ids, 2, 5, chunk=chunk)
    eager, _ = stream_logits(tiny_lm("llama", attn="eager"), ids, 2, 5, chunk=chunk)
    assert_close(eager, sdpa, f"eager vs sdpa, chunk {chunk}")


# -- chunked prefill ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ROTARY + ("gemma3",))  # gemma3: two rotary frequencies (local and global layers)
@pytest.mark.parametrize("chunk", [3, 40])
def test_chunked_prefill_equals_token_by_token(family, chunk):
    """A prompt much longer than the window, fed in chunks (even all at once), is windowed from its first
    token: same logits and same kept keys/values as feeding it token by token."""
    model = tiny_lm(family)
    ids = ids_for(40, batch=2, seed=3)
    one, cache_one = stream_logits(model, ids, 2, 5, chunk=1)
    many, cache_many = stream_logits(model, ids, 2, 5, chunk=chunk)
    assert_close(many, one, f"{family} chunk {chunk} vs token by token")
    assert cache_many.kept() == cache_one.kept() == [2 + 5] * 2
    with torch.no_grad():  # what comes next sees the same cache
        nxt = ids_for(1, batch=2, seed=9)
        assert_close(
            model(input_ids=nxt, past_key_values=cache_many).logits, model(input_ids=nxt, past_key_values=cache_one).logits,
            f"{family} chunk {chunk}: next token after the prefill",
        )


def test_long_inputs_are_fed_in_chunks_of_chunk_size():
    """One 40-token call through a cache with chunk_size 6 returns all 40 logits, equal to token by token."""
    model = tiny_lm("qwen3")
    ids = ids_for(40, batch=2, seed=4)
    one, _ = stream_logits(model, ids, 2, 5, chunk=1)
    whole, cache = stream_logits(model, ids, 2, 5, chunk=40, chunk_size=6)
    assert whole.shape == one.shape and cache.seen() == [40, 40]
    assert_close(whole, one, "40 tokens in one call, chunk_size 6, vs token by token")
    cache = SinkCache(model, sinks=2, window=5, chunk_size=6)
    with torch.no_grad():
        last = model(input_ids=ids, past_key_values=cache, logits_to_keep=9).logits
    assert_close(last, one[:, -9:], "logits_to_keep=9 across chunks")


# -- a step is atomic; the model is left as it was -------------------------------------------------
def test_an_interrupted_forward_leaves_the_cache_as_it_was():
    model = tiny_lm("llama")
    ids = ids_for(20)
    clean, _ = stream_logits(model, ids, 2, 4)
    cache = SinkCache(model, sinks=2, window=4)
    out = []

    def boom(module, args):
        raise KeyboardInterrupt

    with torch.no_grad():
        for i in range(20):
            if i in (3, 12):  # interrupt inside the second decoder layer, then retry the same token
                handle = model.model.layers[1].register_forward_pre_hook(boom)
                with pytest.raises(KeyboardInterrupt):
                    model(input_ids=ids[:, i : i + 1], past_key_values=cache)
                handle.remove()
            out.append(model(input_ids=ids[:, i : i + 1], past_key_values=cache).logits)
    assert_close(torch.cat(out, 1), clean, "stream with two interrupted steps vs uninterrupted")


def test_the_model_is_left_as_it_was():
    """The edit acts only on calls with a SinkCache and is removed with the model's last SinkCache."""
    model = tiny_lm("llama")
    ids = ids_for(12, batch=2)
    with torch.no_grad():
        plain = model(ids).logits
        cache = SinkCache(model, sinks=2, window=4)
        second = SinkCache(model, sinks=1, window=3)
        assert model._forward_pre_hooks and model._forward_hooks
        from transformers import DynamicCache

        other = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        assert_close(other, plain, "a live SinkCache does not touch calls with another cache (no-op edit)", atol=0)
        assert_close(model(ids).logits, plain, "nor calls without a cache", atol=0)
    del cache
    gc.collect()
    assert model._forward_pre_hooks, "removed while another SinkCache of the model lives"
    del second
    gc.collect()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_cache_reset_starts_a_new_stream():
    model = tiny_lm("llama")
    ids = ids_for(20)
    first, cache = stream_logits(model, ids, 2, 4, chunk=5)
    cache.reset()
    with torch.no_grad():
        again = torch.cat([model(input_ids=ids[:, i : i + 5], past_key_values=cache).logits for i in range(0, 20, 5)], 1)
    assert_close(again, first, "after reset()", atol=0)


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
    one = perplexity(model, tokens, PplConfig(mode="sink", sinks=2, window=5, chunk_size=1), progress=False)
    big = perplexity(model, tokens, PplConfig(mode="sink", sinks=2, window=5, chunk_size=16), progress=False)
    assert_close(torch.tensor(big.nll_curve), torch.tensor(one.nll_curve), "sink ppl: chunk 16 vs 1", atol=1e-4)
    rec = perplexity(model, tokens, PplConfig(mode="recompute", sinks=2, window=5, chunk_size=4), progress=False)
    manual = []
    with torch.no_grad():
        for j in range(44):
            kept = list(range(min(2, j + 1))) + list(range(max(2, j - 5), j + 1))  # sinks, 5 before, itself
            logits = model(tokens[kept][None]).logits[0, -1]
            manual.append(float(torch.nn.functional.cross_entropy(logits[None], tokens[j + 1][None])))
    assert_close(torch.tensor(rec.nll_curve), torch.tensor(manual), "recompute vs a fresh forward per token", atol=1e-4)
    sparse = perplexity(model, tokens, PplConfig(mode="recompute", sinks=2, window=5, every=5), progress=False)
    assert sparse.scored_positions == list(range(0, 44, 5))
    assert_close(torch.tensor(sparse.nll_curve), torch.tensor(manual[::5]), "recompute --every 5", atol=1e-4)


def test_ppl_cross_entropy_matches_float64():
    """The NLL on the (n, V) layout agrees with a float64 log-softmax (the (B, V, n) layout is ~1e-4 low on CPU)."""
    from sinkless.streaming.ppl import _nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, 49152, generator=g) * 4  # (B, n, V), a real vocabulary size
    targets = torch.randint(0, 49152, (2, 300), generator=g)
    reference = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    ours = _nll(logits, targets).double()
    mean_gap = (ours - reference).mean().item()
    print(f"(n, V) cross-entropy vs float64: max |diff| {(ours - reference).abs().max().item():.2g}, mean {mean_gap:.2g} nats")
    assert abs(mean_gap) < 1e-5 and (ours - reference).abs().max() < 1e-4


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
    from conftest import tiny_model

    with pytest.raises(SinklessError, match="no rotary position embeddings"):
        SinkCache(tiny_model("gpt2"), sinks=4, window=8)


@pytest.mark.parametrize("sinks,window", [(-1, 8), (0, 0), (2, 1.5)])
def test_bad_sizes_are_refused(sinks, window):
    with pytest.raises(SinklessError):
        SinkCache(tiny_lm("llama"), sinks=sinks, window=window)


def test_inputs_that_cannot_be_honoured_are_refused():
    model = tiny_lm("llama")
    ids = ids_for(6, batch=2)
    cache = SinkCache(model, sinks=2, window=4)
    with torch.no_grad():
        with pytest.raises(SinklessError, match="4D mask"):
            model(ids, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool), past_key_values=cache)
        with pytest.raises(SinklessError, match="position_ids skip"):
            model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2), past_key_values=cache)
        model(ids, past_key_values=cache)
        with pytest.raises(SinklessError, match="batch of 3"):
            model(ids_for(1, batch=3), past_key_values=cache)
        with pytest.raises(SinklessError, match="columns"):
            model(ids[:, :1], attention_mask=torch.ones(2, 3), past_key_values=cache)
        with pytest.raises(SinklessError, match="real tokens"):
            model(ids[:, :1], attention_mask=torch.tensor([[1] * 7, [0] + [1] * 6]), past_key_values=cache)
        with pytest.raises(RuntimeError, match="submodules"):
            model.model(input_ids=ids[:, :1], past_key_values=cache)
    assert cache.seen() == [6, 6], "a refused call changed the cache"


def test_window_mode_with_sinks_and_bad_flags_are_refused():
    from sinkless.streaming.ppl import PplConfig

    with pytest.raises(SinklessError, match="window keeps no sinks"):
        PplConfig(mode="window", sinks=4).resolved()
    with pytest.raises(SinklessError, match="--every"):
        PplConfig(mode="sink", every=4).resolved()
    with pytest.raises(SinklessError, match="--sinks"):
        PplConfig(mode="recompute", sinks=-2).resolved()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ppl", "--model", "smollm2-135m", "--mode", "sink", "--text", "/no/such/file.txt"], "does not exist"),
        (["ppl", "--model", "smollm2-135m", "--mode", "window", "--sinks", "4"], "keeps no sinks"),
        (["ppl", "--model", "smollm2-135m", "--device", "tpu"], "unknown device"),
        (["stream", "--model", "smollm2-135m", "--sinks", "-1", "--prompt", "x"], "--sinks N with N >= 0"),
        (["stream", "--model", "smollm2-135m", "--top-p", "1.5", "--temperature", "1", "--prompt", "x"], "--top-p"),
        (["stream", "--model", "smollm2-135m", "--dtype", "int3", "--prompt", "x"], "invalid choice"),
    ],
)
def test_cli_user_mistakes_exit_2(argv, message, capsys):
    from sinkless.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse choices
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


# -- the cache's bookkeeping, by hand -----------------------------------------------------------------
# (pinned to the paper's counting: S + W kept between steps, S + W + 1 attended, in-cache positions)
def test_kept_positions_by_hand():
    cache = SinkCache(tiny_lm("llama"), sinks=2, window=4)
    assert cache.capacity == 6 and cache.get_max_length() == 7
    assert cache.kept_positions(0) == [0] and cache.kept_positions(1) == [0, 1]
    assert cache.kept_positions(3) == [0, 1, 2, 3]
    assert cache.kept_positions(6) == [0, 1, 2, 3, 4, 5, 6]  # 2 sinks + 4 before + itself: nothing evicted yet
    assert cache.kept_positions(7) == [0, 1, 3, 4, 5, 6, 7]  # the 4 before 7 (3..6) after the 2 sinks
    assert cache.kept_positions(10) == [0, 1, 6, 7, 8, 9, 10]
    no_sinks = SinkCache(tiny_lm("llama"), sinks=0, window=3)
    assert no_sinks.kept_positions(7) == [4, 5, 6, 7] and no_sinks.kept_positions(1) == [0, 1]


def test_cache_between_steps_holds_sinks_and_window():
    model = tiny_lm("llama")
    _, cache = stream_logits(model, ids_for(11), sinks=2, window=4)
    assert cache.seen() == [11] and cache.kept() == [2 + 4] and cache.get_seq_length() == 11  # columns generate counts
    assert sorted(p for p in cache.slot_pos[0].tolist() if p >= 0) == [0, 1, 7, 8, 9, 10]  # sinks, then 11 - 4 ..
    assert repr(cache) == "SinkCache(sinks=2, window=4, seen=[11], kept=[6])"
    cache.reset()
    assert (cache.seen(), cache.kept(), cache.get_seq_length(), cache.rebases, cache.pending) == ([], [], 0, 0, False)
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(1)


def test_step_positions_and_mask_before_eviction():
    cache = SinkCache(tiny_lm("llama"), sinks=2, window=4)
    inputs = cache.prepare(torch.ones(2, 3, dtype=torch.bool))
    assert inputs["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    mask = inputs["attention_mask"]  # columns [sinks (2) | slots (2, empty) | new tokens (3)]
    assert mask.shape == (2, 1, 3, 7) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 1]]
    assert cache.pending
    cache.prepare(torch.ones(2, 1, dtype=torch.bool))  # a step that never ran is dropped, not merged
    cache.abort()
    assert not cache.pending and cache.seen() == [0, 0]
    with pytest.raises(RuntimeError, match="assigns the positions and mask of each step"):
        cache.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), 0)


def test_eager_mask_is_additive():
    cache = SinkCache(tiny_lm("llama", attn="eager"), sinks=1, window=2)
    mask = cache.prepare(torch.ones(1, 2, dtype=torch.bool))["attention_mask"][0, 0]  # [sink | slot | new (2)]
    assert mask.dtype == torch.float32 and mask[0, 0] == 0 and mask[1, 0] == 0 and mask[1, 3] == 0
    assert mask[0, 1] == mask[0, 3] == mask[1, 2] == torch.finfo(torch.float32).min


@pytest.mark.parametrize(
    "sinks, window, message",
    [
        (-1, 8, "bad cache size: sinks=-1, window=8\n  fix: use --sinks >= 0 and --window >= 1 (the paper: --sinks 4 --window 1020)"),
        (0, 0, "bad cache size: sinks=0, window=0\n  fix: use --sinks >= 0 and --window >= 1 (the paper: --sinks 4 --window 1020)"),
        (2, 1.5, "--window must be a whole number, got 1.5"),
    ],
)
def test_bad_sizes_messages(sinks, window, message):
    with pytest.raises(SinklessError) as error:
        SinkCache(tiny_lm("llama"), sinks=sinks, window=window)
    assert str(error.value) == message
    assert SinkCache(tiny_lm("llama"), sinks=4, window=4).capacity == 8  # paper counting: any window >= 1


def test_models_that_cannot_stream_are_named():
    from conftest import tiny_model
    from sinkless.streaming import check_streamable

    with pytest.raises(SinklessError, match="BertModel is not a causal language model"):
        check_streamable(tiny_model("bert"), 2, 4)
    with pytest.raises(SinklessError, match="GPT2LMHeadModel has no rotary position embeddings"):
        check_streamable(tiny_model("gpt2"), 2, 4)
    model = tiny_lm("llama")
    model.config.rope_parameters = {**(model.config.rope_parameters or {}), "rope_type": "dynamic"}
    with pytest.raises(SinklessError, match="uses 'dynamic' rotary scaling") as error:
        check_streamable(model, 2, 4)
    assert "default, linear, llama3, yarn" in error.value.fix
    sliding = tiny_lm("mistral")
    sliding.config.sliding_window = 5
    assert check_streamable(sliding, 2, 4).sliding == (5, 5, 5)  # narrower than the cache: masked, not refused
    flash = tiny_lm("llama")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(SinklessError, match="needs sdpa or eager attention, and LlamaForCausalLM uses 'flash_attention_2'"):
        check_streamable(flash, 2, 4)
    inv = check_streamable(tiny_lm("llama"), 2, 4).inv_freq[0]
    assert inv.shape == (8,) and inv.dtype == torch.float32 and float(inv[0]) == 1.0


# -- what mutation testing found unguarded ----------------------------------------------------------
def test_a_fresh_cache_and_its_messages():
    model = tiny_lm("llama")
    cache = SinkCache(model, sinks=2, window=4)
    assert repr(cache) == "SinkCache(sinks=2, window=4, seen=None, kept=[])" and cache.batch_size == -1
    with torch.no_grad():
        model(input_ids=ids_for(3, batch=2), past_key_values=cache)
    with pytest.raises(SinklessError) as error, torch.no_grad():
        model(input_ids=ids_for(1, batch=3), past_key_values=cache)
    assert (error.value.problem, error.value.fix) == (
        "this SinkCache holds 2 stream(s) and was given a batch of 3", "use one SinkCache per batch (or cache.reset() to start over)")
    with pytest.raises(NotImplementedError) as error:
        cache.crop(1)
    assert str(error.value) == "a SinkCache cannot be rolled back: evicted tokens are gone"
    cache.abort()
    with pytest.raises(RuntimeError) as error:
        cache.update(torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, 1, 16), 0)
    assert str(error.value) == ("a SinkCache assigns the positions and mask of each step: call the model it was built with "
                                "(model(..., past_key_values=cache) or model.generate), not one of its submodules")


def test_layers_hold_keys_and_values_slot_for_slot():
    from sinkless.streaming.cache import SinkLayer

    model = tiny_lm("llama")
    for sinks, chunk in ((2, 1), (2, 5), (0, 1)):  # without sinks, the very first step is a one-token one
        _, cache = stream_logits(model, ids_for(14, batch=2), sinks, 4, chunk=chunk)
        for layer in cache.layers:
            assert layer.keys.shape[:3] == layer.values.shape[:3] and layer.get_seq_length() == layer.keys.shape[2]
            assert layer.get_mask_sizes(5) == (layer.keys.shape[2], 0) and layer.get_max_length() == -1
        with pytest.raises(RuntimeError, match="updated through SinkCache.update"):
            cache.layers[0].update(torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, 1, 16))
    fresh = SinkLayer(0)
    assert fresh.get_seq_length() == 0 and fresh.get_mask_sizes(5) == (5, 0)
    cache.reset()
    assert all(not layer.is_initialized and layer.get_seq_length() == 0 for layer in cache.layers)


def test_reordered_rows_carry_their_own_stream():
    """Beam search and batch edits move whole rows: sinks, window, frame and the last logits follow their row."""
    model = tiny_lm("llama")
    ids = ids_for(14, batch=2, seed=5)  # past the window: sinks and window hold different tokens per row
    nxt = ids_for(3, batch=2, seed=6)
    with torch.no_grad():
        _, cache = stream_logits(model, ids, 2, 4)
        last = cache.last_logits.clone()
        cache.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(cache.last_logits, last[[1, 0]])
        got = torch.cat([model(input_ids=nxt[[1, 0], i : i + 1], past_key_values=cache).logits for i in range(3)], 1)
        _, swapped = stream_logits(model, ids[[1, 0]], 2, 4)
        expected = torch.cat([model(input_ids=nxt[[1, 0], i : i + 1], past_key_values=swapped).logits for i in range(3)], 1)
        assert_close(got, expected, "reordered rows vs a cache built in that order")

        _, cache = stream_logits(model, ids, 2, 4)
        cache.batch_repeat_interleave(2)
        assert cache.seen() == [14] * 4 and cache.batch_size == 4
        got = model(input_ids=nxt[[0, 0, 1, 1], :1], past_key_values=cache).logits
        _, repeated = stream_logits(model, ids[[0, 0, 1, 1]], 2, 4)
        assert_close(got, model(input_ids=nxt[[0, 0, 1, 1], :1], past_key_values=repeated).logits, "repeated rows")
        cache.batch_select_indices(torch.tensor([3]))
        assert cache.batch_size == 1
        got = model(input_ids=nxt[1:, 1:2], past_key_values=cache).logits
        _, single = stream_logits(model, torch.cat([ids[1:], nxt[1:, :1]], 1), 2, 4)
        assert_close(got, model(input_ids=nxt[1:, 1:2], past_key_values=single).logits, "one selected row")

        _, cache = stream_logits(model, ids[:, :1], 0, 4)  # no sinks: the very first step is already a one-token one
        cache.reorder_cache(torch.tensor([1, 0]))
        got = model(input_ids=nxt[[1, 0], :1], past_key_values=cache).logits
        _, swapped = stream_logits(model, ids[[1, 0], :1], 0, 4)
        assert_close(got, model(input_ids=nxt[[1, 0], :1], past_key_values=swapped).logits, "reordered after a first one-token step")


def test_rebase_schedule_per_row():
    """Each row's window is rotated back once its frame positions pass 2 (S + W), to count - min(count, S + W)."""
    model = tiny_lm("llama")
    sinks, window = 1, 3  # capacity 4: a rebase once a row is more than 8 tokens ahead of its frame
    lags = [0, 3, 1]  # pads before each row's tokens: rows reach the limit at different steps (one exactly at it)
    ids = ids_for(30, batch=3, seed=7)
    mask = torch.ones(3, 30, dtype=torch.long)
    for row, lag in enumerate(lags):
        mask[row, :lag] = 0
    cache = SinkCache(model, sinks=sinks, window=window)
    frames, expected, rebases, expected_rebases = [], [], [], []
    frame, n_rebases = [0] * 3, 0
    with torch.no_grad():
        for t in range(30):
            model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            counts = [max(0, t + 1 - lag) for lag in lags]
            moved = [c - f > 2 * (sinks + window) for c, f in zip(counts, frame)]
            frame = [c - min(c, sinks + window) if m else f for c, f, m in zip(counts, frame, moved)]
            n_rebases += any(moved)
            frames.append(cache.frame.tolist())
            expected.append(list(frame))
            rebases.append(cache.rebases)
            expected_rebases.append(n_rebases)
    assert cache.seen() == [30, 27, 29]
    assert frames == expected and rebases == expected_rebases and n_rebases >= 5


def test_positions_are_integers():
    cache = SinkCache(tiny_lm("llama"), sinks=2, window=4)
    assert cache.prepare(torch.ones(1, 3, dtype=torch.bool))["position_ids"].dtype == torch.long
    _, cache = stream_logits(tiny_lm("llama"), ids_for(20), 2, 4)
    assert cache.frame.dtype == torch.long and cache.prepare(torch.ones(1, 1, dtype=torch.bool))["position_ids"].dtype == torch.long


def test_decode_steps_write_in_place_and_rotate_stacked_sinks():
    """A one-token step writes into a free slot of the same buffers (no copy of the window) and rotates every
    layer's sinks at once from a stack the layers view; layers whose sinks cannot stack (another dtype or
    shape: a model split over devices) fall back to one rotation per layer with the same result."""
    model = tiny_lm("llama")
    ids = ids_for(24, seed=8)
    with torch.no_grad():
        whole, _ = stream_logits(model, ids, 2, 4)
        cache = SinkCache(model, sinks=2, window=4)
        model(input_ids=ids[:, :12], past_key_values=cache)  # a prefill past the window
        stack = cache._sink_stack
        assert stack is not None and all(layer.sink_keys.data_ptr() == stack[i].data_ptr() for i, layer in enumerate(cache.layers))
        model(input_ids=ids[:, 12:13], past_key_values=cache)  # the buffer grows once to S + W + 1 slots
        steps, buffers = [], []
        for t in range(13, 24):
            steps.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits)
            buffers.append((cache.rebases, [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]))
    assert_close(torch.cat(steps, 1), whole[:, 13:], "in-place decode steps vs token by token")
    for (rebases, ptrs), (next_rebases, next_ptrs) in zip(buffers, buffers[1:]):
        assert [v for _, v in next_ptrs] == [v for _, v in ptrs]  # values are never copied
        assert next_rebases != rebases or next_ptrs == ptrs  # keys only when a rebase rotates the window back
    assert buffers[0][0] < buffers[-1][0] and len({r for r, _ in buffers}) < len(buffers) - 2  # both cases happen

    layer = cache.layers[1]
    kept = layer.sink_keys
    layer.sink_keys = kept.double()
    cache._stack_sinks()
    assert cache._sink_stack is None  # another dtype: not stacked
    layer.sink_keys = kept[:, :, :1].clone()
    cache._stack_sinks()
    assert cache._sink_stack is None  # another shape: not stacked
    layer.sink_keys = kept.clone()
    cache._stack_sinks()
    assert cache._sink_stack is not None


def test_per_layer_sink_rotation_equals_the_stacked_one(monkeypatch):
    model = tiny_lm("qwen3")
    ids = ids_for(24, batch=2, seed=9)
    stacked, _ = stream_logits(model, ids, 2, 4)
    monkeypatch.setattr(SinkCache, "_stack_sinks", lambda self: setattr(self, "_sink_stack", None))
    per_layer, cache = stream_logits(model, ids, 2, 4)
    assert cache._sink_stack is None
    assert_close(per_layer, stacked, "sinks rotated per layer vs stacked")


def test_the_paper_defaults_and_chunk_size_checks():
    """``SinkCache(model)`` is the paper's "4 + 1020" fed in chunks of 512; chunk_size must be a whole number >= 1."""
    model = tiny_lm("llama")
    cache = SinkCache(model)
    assert (cache.sinks, cache.window, cache.chunk_size, cache.capacity) == (4, 1020, 512, 1024)
    for bad in (0, -3, True, 2.5, "8"):
        with pytest.raises(SinklessError) as error:
            SinkCache(model, sinks=2, window=4, chunk_size=bad)
        assert str(error.value) == f"chunk_size must be a whole number >= 1, got {bad!r}"
    assert SinkCache(model, sinks=2, window=4, chunk_size=1).chunk_size == 1
    with pytest.raises(RuntimeError) as error:
        cache.layers[0].update(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16))
    assert str(error.value) == "a SinkCache layer is updated through SinkCache.update"


def test_reset_forgets_the_last_logits_and_an_interrupted_first_step_can_be_reordered():
    model = tiny_lm("llama")
    _, cache = stream_logits(model, ids_for(9, batch=2), 2, 4)
    assert cache.last_logits.shape == (2, 64)
    cache.reset()
    assert cache.last_logits is None and cache.seen() == []
    cache.prepare(torch.ones(2, 3, dtype=torch.bool))  # a first step that never ran (Ctrl-C before its forward)
    cache.abort()
    cache.reorder_cache(torch.tensor([1, 0]))  # beam search may still move its rows
    assert cache.last_logits is None and cache.seen() == [0, 0]
    ids = ids_for(9, batch=2, seed=3)
    with torch.no_grad():
        got = model(input_ids=ids, past_key_values=cache).logits
    expected, _ = stream_logits(model, ids, 2, 4, chunk=9)
    assert_close(got, expected, "a stream after an aborted, reordered first step vs a fresh one")


def test_a_step_is_laid_out_on_the_inputs_device():
    """``prepare`` puts the step's positions and mask on the inputs' device ('meta' stands in for a GPU)."""
    cache = SinkCache(tiny_lm("llama"), sinks=2, window=4)
    step = cache.prepare(torch.ones(2, 3, dtype=torch.bool), device=torch.device("meta"))
    assert step["position_ids"].device.type == "meta" and step["attention_mask"].device.type == "meta"
    cache.abort()
    step = cache.prepare(torch.ones(2, 3, dtype=torch.bool), device=torch.device("cpu"))
    assert step["position_ids"].device.type == "cpu" and step["attention_mask"].device.type == "cpu"


def test_layers_on_another_device_keep_their_keys_there():
    """A model split over devices: each layer's slots, sink rotations and rebases stay on its keys' device
    ('meta' stands in for a second device, so its values are not computed), and a CPU layer of the split model
    returns exactly what it returns in an all-CPU cache: prefill past the window, one-token steps, a rebase."""
    model = tiny_lm("llama")  # 3 layers, 1 key/value head of dim 16
    gen = torch.Generator().manual_seed(11)
    lengths = [8] + [1] * 14  # 22 tokens: capacity 6, a rebase once a row is 13 ahead of its frame
    states = [(torch.randn(2, 1, n, 16, generator=gen), torch.randn(2, 1, n, 16, generator=gen)) for n in lengths]
    for devices in (("cpu", "meta", "meta"), ("meta", "meta", "meta")):  # sinks rotated per layer / stacked
        split, plain = SinkCache(model, sinks=2, window=4), SinkCache(model, sinks=2, window=4)
        for keys, values in states:
            valid = torch.ones(2, keys.shape[2], dtype=torch.bool)
            split.prepare(valid, device=torch.device("cpu"))
            plain.prepare(valid)
            for i, device in enumerate(devices):
                got_k, got_v = split.update(keys.to(device), values.to(device), i)
                ref_k, ref_v = plain.update(keys, values, i)
                assert got_k.device.type == got_v.device.type == device, devices
                assert got_k.shape == ref_k.shape and got_v.shape == ref_v.shape
                if device == "cpu":
                    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        assert split.seen() == plain.seen() == [22, 22] and split.rebases == plain.rebases >= 1
        assert all(layer.keys.device.type == device for layer, device in zip(split.layers, devices))
        assert (split._sink_stack is not None) == (len(set(devices)) == 1)
