"""A sink + window KV cache on the transformers 5 Cache API (Xiao et al. 2024, "Efficient Streaming
Language Models with Attention Sinks").

The cache keeps the key/value states of the first ``S`` tokens of a stream (the attention sinks) and
of the last ``W`` tokens, and evicts the middle. Positions are assigned by the cache, not by the text:
every query sees its kept tokens as if they were one contiguous sequence, sinks at positions
``0..S-1`` followed by the window. The model is unmodified; the cache drives it through three public
inputs of a Hugging Face forward: ``position_ids``, a ready-made 4D ``attention_mask`` and
``past_key_values`` (whose ``update`` returns the keys and values each layer attends to).

Why not rotate every cached key at every step (the reference implementation's choice)? Rotary
attention only sees position *differences*, so keys are kept post-RoPE in a *frame*: a window token
at text position ``u`` sits at rotary position ``u - frame``. Distances between a query and the window
are then text distances, which is what in-cache positions give too; only the sinks must look closer
than they are, so the ``S`` sink keys are rotated for each query (``S`` keys, not ``S + W``). When the
frame positions grow past ``2 (S + W)`` the window is rotated back once (a *rebase*): one full-window
rotation every ``S + W`` tokens instead of one per token, and positions stay in the range the model
was trained on.

Chunks are exact: each query of a chunk of ``n`` new tokens attends to exactly the sinks and its own
last ``W`` tokens (a per-query band in the 4D mask; queries whose sinks need a different rotation
get their own rotated copy of the ``S`` sink keys), so feeding a prompt in chunks gives the logits and
cache of feeding it token by token, and a prompt longer than the window is windowed from its first
token.

Legend: B batch, h key/value heads, d head dim, n new tokens, K keys attended, G sink copies.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from sinkless.errors import SinklessError

__all__ = ["SinkCache", "streaming_forward", "check_streamable", "rotary_inv_freq"]

# rope variants whose frequencies do not depend on the sequence length: rotating a cached key by a
# position difference is exact for them
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_MASK_KINDS = ("sdpa", "eager")


# -- what the model must be -----------------------------------------------------------------------
def _arch(model: nn.Module) -> str:
    return type(model).__name__


def rotary_inv_freq(model: nn.Module, *, no_rope_fix: str | None = None) -> torch.Tensor:
    """The rotary inverse frequencies ``(d/2,)`` of a causal LM; a clear error for models without RoPE.

    ``no_rope_fix``: the fix line of that error, for callers without ``--mode`` (``sinkless stream``).
    """
    # ``inv_freq``, or one ``<layer type>_inv_freq`` per layer type (Gemma3: sliding and full attention)
    rotary = {name: buffer for name, buffer in model.named_buffers(remove_duplicate=False)
              if name.endswith("inv_freq") and not name.endswith("original_inv_freq")}
    if not rotary:
        raise SinklessError(
            f"{_arch(model)} has no rotary position embeddings (it adds absolute position embeddings to its inputs), "
            "so cached tokens cannot be given new positions as StreamingLLM needs",
            fix=no_rope_fix or "use a rotary model (Llama family incl. SmolLM2, Qwen3, Mistral), or --mode full / recompute",
        )
    config = getattr(model, "config", None)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise SinklessError(
            f"{_arch(model)} uses {rope_type!r} rotary scaling, whose frequencies change with the sequence length",
            fix=f"streaming supports rope types {', '.join(_STATIC_ROPE)}",
        )
    frequencies = list(rotary.values())
    if any(f.shape != frequencies[0].shape or not torch.equal(f, frequencies[0]) for f in frequencies[1:]):
        raise SinklessError(
            f"{_arch(model)} rotates its layers with different rotary frequencies "
            f"({', '.join(sorted({name.rsplit('.', 1)[-1] for name in rotary}))}), "
            "and the sink cache re-rotates every layer's cached keys alike",
            fix="use --mode full / recompute with this model, or a model with one rotary embedding (Llama, Qwen3, Mistral)",
        )
    inv_freq = frequencies[0].detach().float()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if 2 * inv_freq.numel() != head_dim:
        raise SinklessError(
            f"{_arch(model)} rotates {2 * inv_freq.numel()} of {head_dim} head dimensions (partial rotary)",
            fix="streaming supports models that rotate the whole head (Llama, Qwen3, Mistral)",
        )
    return inv_freq


def check_streamable(model: nn.Module, sinks: int, window: int, *, no_rope_fix: str | None = None) -> torch.Tensor:
    """Raise a ``SinklessError`` unless ``model`` can stream with ``sinks`` + ``window``; returns its inv_freq."""
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or getattr(model.config, "is_encoder_decoder", False):
        raise SinklessError(
            f"{_arch(model)} is not a causal language model",
            fix="stream a decoder-only LM (Llama family incl. SmolLM2, Qwen3, Mistral)",
        )
    if sinks < 0 or window < 1:
        raise SinklessError(f"bad cache size: sinks={sinks}, window={window}", fix="use --sinks >= 0 and --window >= 1")
    if window <= sinks:
        raise SinklessError(
            f"window ({window}) must be larger than the number of sinks ({sinks})",
            fix="the window holds the recent tokens; the paper uses --sinks 4 --window 1020",
        )
    inv_freq = rotary_inv_freq(model, no_rope_fix=no_rope_fix)
    sliding = getattr(model.config, "sliding_window", None)
    layer_types = getattr(model.config, "layer_types", None) or []
    if sliding and (sliding < sinks + window) and ("sliding_attention" in layer_types or not layer_types):
        raise SinklessError(
            f"{_arch(model)} attends over a sliding window of {sliding} tokens, smaller than sinks + window ({sinks + window})",
            fix=f"use --sinks + --window <= {sliding}",
        )
    _check_attention(model.config._attn_implementation)
    return inv_freq


def _check_attention(impl: str | None) -> None:
    if impl not in _MASK_KINDS:
        raise SinklessError(
            f"streaming needs sdpa or eager attention, and the model uses {impl!r}",
            fix="model.set_attn_implementation('sdpa')",
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(inv_freq: torch.Tensor, shifts: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(len(shifts), d)`` that move a rotated key by ``shifts`` positions (Llama's half-split layout)."""
    angles = shifts.double()[:, None] * inv_freq.double()[None, :]  # float64: exact for any shift
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _shift(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys by a position difference (RoPE composes: R(p + s) = R(s) R(p))."""
    return keys * cos + _rotate_half(keys) * sin


# -- one step's layout ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    """What every layer attends to during one forward of ``n_new`` tokens."""

    n_new: int
    sink_cos: torch.Tensor | None  # (G, d) rotation of the sink keys for each sink copy; None: no copies
    sink_sin: torch.Tensor | None


# -- the cache ------------------------------------------------------------------------------------
class SinkWindowLayer(CacheLayerMixin):
    """One layer's kept keys/values ``(B, h, kept, d)``: the sinks, then the last ``window - 1`` tokens
    (between steps; during a step the new tokens are appended, then evicted when the step completes)."""

    is_sliding = True
    is_croppable = False

    def __init__(self, owner: SinkCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._owner._plan
        if plan is None:
            raise RuntimeError(
                "SinkCache needs its positions and mask: call model(..., past_key_values=cache, **cache.step_inputs(n)) "
                "or use sinkless.streaming.streaming_forward"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # (B, h, kept + n, d)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if plan.sink_cos is None:
            return self.keys, self.values
        s = self._owner.sinks
        sink_k = self.keys[:, :, None, :s, :]  # (B, h, 1, S, d)
        copies_k = _shift(sink_k, plan.sink_cos[:, None, :], plan.sink_sin[:, None, :])  # (B, h, G, S, d)
        b, h, g, _, d = copies_k.shape
        copies_v = self.values[:, :, None, :s, :].expand(b, h, g, s, d)
        keys = torch.cat([copies_k.reshape(b, h, g * s, d), self.keys], dim=-2)  # (B, h, K, d)
        values = torch.cat([copies_v.reshape(b, h, g * s, d), self.values], dim=-2)
        return keys, values

    def drop(self, start: int, count: int) -> None:
        """Evict ``count`` kept tokens from index ``start`` on."""
        if self.is_initialized and count > 0:
            self.keys = torch.cat([self.keys[..., :start, :], self.keys[..., start + count :, :]], dim=-2)
            self.values = torch.cat([self.values[..., :start, :], self.values[..., start + count :, :]], dim=-2)

    def rotate(self, start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Move the kept keys from index ``start`` on by one position difference (a rebase)."""
        if self.is_initialized and self.keys.shape[-2] > start:
            moved = _shift(self.keys[..., start:, :], cos.to(self.keys.dtype), sin.to(self.keys.dtype))
            self.keys = torch.cat([self.keys[..., :start, :], moved], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return self._owner.sinks + self._owner.window

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class SinkCache(Cache):
    """Keeps the first ``sinks`` tokens and the last ``window`` tokens of a stream, for an unmodified HF causal LM.

    Every forward through it takes the positions and mask the cache assigns::

        cache = SinkCache(model, sinks=4, window=1020)
        out = model(input_ids=chunk, past_key_values=cache, use_cache=True, **cache.step_inputs(chunk.shape[1]))

    (``streaming_forward(model, cache, ids)`` does exactly this.) Each new token attends to the sinks and
    to the last ``window`` tokens including itself, at in-cache positions: ``sinks + window`` tokens at most.
    """

    def __init__(self, model: nn.Module, *, sinks: int = 4, window: int = 1020) -> None:
        inv_freq = check_streamable(model, sinks, window)
        self.sinks, self.window = int(sinks), int(window)
        self._config = model.config
        self._n_layers = int(model.config.num_hidden_layers)
        self._inv_freq = inv_freq
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        super().__init__(layers=[SinkWindowLayer(self) for _ in range(self._n_layers)])
        self._clear()

    def _clear(self) -> None:
        self.seen = 0  # tokens of the stream processed so far; token u has text position u
        self.window_start = self.sinks  # text position of the first kept window token
        self.frame = 0  # a kept window token u sits at rotary position u - frame
        self.rebases = 0
        self._plan: _Plan | None = None

    def __repr__(self) -> str:
        return f"SinkCache(sinks={self.sinks}, window={self.window}, seen={self.seen}, kept={self.get_seq_length()})"

    # -- positions ----------------------------------------------------------------------------
    def in_cache_position(self, t: torch.Tensor) -> torch.Tensor:
        """The in-cache position of text token ``t`` when it is the newest token: ``min(t, S + W - 1)``."""
        return t.clamp(max=self.sinks + self.window - 1)

    def kept_positions(self, t: int) -> list[int]:
        """Text positions that token ``t`` attends to: the sinks, then its last ``window`` tokens."""
        start = max(self.sinks, t - self.window + 1)
        return list(range(min(self.sinks, t + 1))) + list(range(start, t + 1))

    def _evict_for(self, first_query: int) -> None:
        keep_from = max(self.sinks, first_query - self.window + 1)
        n_drop = keep_from - self.window_start
        if n_drop > 0 and self.seen > self.window_start:
            n_drop = min(n_drop, self.seen - self.window_start)
            for layer in self.layers:
                layer.drop(min(self.seen, self.sinks), n_drop)
        self.window_start = max(self.window_start, keep_from)

    def _rebase(self, first_query: int, n_new: int) -> None:
        limit = 2 * (self.sinks + self.window)
        new_frame = first_query - int(self.in_cache_position(torch.tensor(first_query)))
        if first_query + n_new - 1 - self.frame <= limit or new_frame == self.frame:
            return
        cos, sin = _cos_sin(self._inv_freq, torch.tensor([self.frame - new_frame]), torch.float32)
        for layer in self.layers:
            layer.rotate(min(self.seen, self.sinks), cos[0].to(self._device), sin[0].to(self._device))
        self.frame = new_frame
        self.rebases += 1

    def step_inputs(self, n_new: int, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """Evict, rebase and lay out the next forward of ``n_new`` tokens: ``position_ids`` ``(B, n)`` and a 4D
        ``attention_mask`` ``(1, 1, n, K)`` in the format of the model's attention implementation."""
        if self._plan is not None:
            raise RuntimeError("the previous step_inputs() was not followed by a forward through this cache")
        if n_new < 1:
            raise ValueError("n_new must be >= 1")
        impl = self._config._attn_implementation  # read per step: a caller may switch it (eager_attention)
        _check_attention(impl)
        s, w, t0 = self.sinks, self.window, self.seen
        self._evict_for(t0)
        self._rebase(t0, n_new)
        dev = self._device
        t = torch.arange(t0, t0 + n_new, device=dev)  # (n,) text positions of the queries
        pos = t - self.frame  # (n,) rotary positions
        offset = pos - self.in_cache_position(t)  # (n,) how far the sinks must move for each query
        copies = torch.unique(offset[offset != 0]) if s > 0 else offset[:0]  # (G,)
        # kept columns, in the order the layers return them: [sink copies | kept sinks | kept window | new]
        n_sink = min(t0, s)
        kept = torch.cat([
            torch.arange(n_sink, device=dev),
            torch.arange(self.window_start, max(t0, self.window_start), device=dev),
            t,
        ])  # (K0,) text position of each kept column
        is_sink = kept < s
        band = (kept[None, :] <= t[:, None]) & (kept[None, :] > t[:, None] - w)  # (n, K0)
        visible = torch.where(is_sink[None, :], (kept[None, :] <= t[:, None]) & (offset[:, None] == 0), band & ~is_sink)
        if copies.numel():
            own = (offset[:, None] == copies[None, :]).repeat_interleave(s, dim=1)  # (n, G*S)
            visible = torch.cat([own, visible], dim=1)
            cos, sin = _cos_sin(self._inv_freq, copies.cpu(), self._dtype)
            self._plan = _Plan(n_new, cos.to(dev), sin.to(dev))
        else:
            self._plan = _Plan(n_new, None, None)
        mask = visible[None, None]  # (1, 1, n, K)
        if impl == "eager":  # an additive float mask; sdpa takes the boolean one
            mask = torch.zeros(mask.shape, dtype=self._dtype, device=dev).masked_fill(~mask, torch.finfo(self._dtype).min)
        return {"position_ids": pos[None, :].expand(batch_size, n_new), "attention_mask": mask}

    # -- the Cache API ------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self._n_layers - 1:  # the step is complete: keep what the next token needs
            self.seen += self._plan.n_new
            self._plan = None
            self._evict_for(self.seen)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a SinkCache cannot be rolled back: evicted tokens are gone")


def streaming_forward(model: nn.Module, cache: SinkCache, input_ids: torch.Tensor, **kwargs):
    """``model(input_ids)`` through ``cache`` with the cache's positions and mask; returns the model output."""
    inputs = cache.step_inputs(input_ids.shape[1], input_ids.shape[0])
    try:
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **inputs, **kwargs)
    except BaseException:
        cache._plan = None  # some layers took the step, others not: the caller must reset() the cache
        raise
    if cache._plan is not None:
        cache._plan = None
        raise RuntimeError(f"{type(model).__name__} did not update all {cache._n_layers} cache layers")
    return out
