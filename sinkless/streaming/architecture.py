"""Which causal LMs can stream through a sink + window cache (Xiao et al. 2024, "Efficient Streaming
Language Models with Attention Sinks"), decided in one place: ``check_streamable``.

StreamingLLM gives cached tokens new positions, so it needs a model whose keys carry *rotary* position
embeddings that the cache can move after the fact. The check is structural, not a table of class names:

1. a decoder-only model that can generate, with ``sdpa`` or ``eager`` attention (the cache hands the
   model a 4D mask);
2. its rotary frequencies, found by buffer name in the module tree: ``inv_freq``, or
   ``<layer type>_inv_freq`` where local and global layers use different bases (Gemma3), each layer
   taking the buffer of its type; rope types whose frequencies change with the sequence length
   (``dynamic``, ``longrope``) are refused;
3. a probe that the keys really rotate that way: two tokens run at positions ``p`` and ``p + s`` must
   give, in every layer, keys that differ exactly by the rotation the cache applies (half-split layout
   on the first ``2 len(inv_freq)`` dimensions, the rest passing through). This catches models that
   build a rotary module but do not use it (Falcon with ``alibi=True``), interleaved layouts, and
   positions mixed in any other way, and it counts the layers that use the cache.

Sliding-window layers (``config.layer_types`` / ``config.sliding_window``) keep their window: within
the kept tokens they see those at in-cache distance ``< sliding_window``, as a fresh forward over the
kept tokens would. Legend: d head dim, r rotated dims.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn
from transformers import DynamicCache

from sinkless._transformers import cache_kwarg
from sinkless.errors import SinklessError

__all__ = ["StreamSpec", "check_streamable", "MASK_KINDS", "STATIC_ROPE", "shift_keys", "rotation"]

MASK_KINDS = ("sdpa", "eager")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # frequencies fixed: moving a key by s is exact
_LAYER_TYPES = ("full_attention", "sliding_attention")
_PROBE_SHIFT = 3
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What the cache needs to know about a streamable model, one entry per layer that uses the cache."""

    arch: str
    inv_freq: tuple[torch.Tensor, ...]  # (r/2,) float32 per cache layer (shared tensors for shared bases)
    sliding: tuple[int | None, ...]  # sliding window per cache layer, None = full attention
    layer_types: tuple[str, ...]  # the mask key of each cache layer ("full_attention" when untyped)
    mask_dicts: bool  # the model takes {layer type: 4D mask} as attention_mask
    attn_impl: str

    @property
    def n_layers(self) -> int:
        return len(self.inv_freq)


# -- rotations ------------------------------------------------------------------------------------
def rotation(inv_freq: torch.Tensor, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(*shifts.shape, r)`` moving a rotated key by ``shifts`` positions (half-split layout)."""
    angles = shifts.double()[..., None] * inv_freq.double()  # float64: exact for any shift
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def shift_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys ``(..., d)`` by a position difference on their first ``r`` dims (RoPE composes:
    R(p + s) = R(s) R(p)); computed in float32, returned in the keys' dtype."""
    r = cos.shape[-1]
    rot, rest = keys[..., :r].float(), keys[..., r:]
    half = r // 2
    turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    moved = (rot * cos + turned * sin).to(keys.dtype)
    return moved if rest.shape[-1] == 0 else torch.cat((moved, rest), dim=-1)


# -- the check ------------------------------------------------------------------------------------
def _refuse(problem: str, fix: str = "stream a rotary decoder-only LM (Llama family incl. SmolLM2, Qwen, Mistral, Gemma, Phi3)") -> SinklessError:
    return SinklessError(problem, fix=fix)


def _rope_types(config) -> dict[str, str]:
    """rope type per layer type (``""`` when the model has one set of rope parameters for all layers)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # keyed by layer type (Gemma3)
        return {k: v.get("rope_type", v.get("type", "default")) for k, v in rope.items()}
    return {"": rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"}


def _rotary_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name == "inv_freq" or (name.endswith("_inv_freq") and not name.endswith("original_inv_freq")):
                found.setdefault(name, buffer)
    return found


def _layer_types(config) -> list[str] | None:
    types = getattr(config, "layer_types", None)
    return list(types) if types else None


def _causal(n: int, impl: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    visible = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, n, n)
    return visible if impl == "sdpa" else torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


class _KeyRecorder(DynamicCache):
    """A DynamicCache that remembers the (rotated) keys each layer hands it."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.seen: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.seen[layer_idx] = key_states.detach()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def _probe(model: nn.Module, inv_freq: list[torch.Tensor], types: list[str] | None, impl: str) -> tuple[list[int], bool]:
    """Run two tokens at positions (0, 1) and (s, s + 1); return the cache layers and whether the model takes
    per-layer-type mask dicts. Raises when the keys do not rotate as the cache will move them."""
    param = next(model.parameters())
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.tensor([[1 % vocab, 2 % vocab]], device=param.device)  # (1, 2)
    keys, mask_dicts = [], False
    for start in (0, _PROBE_SHIFT):
        recorder = _KeyRecorder(model.config)
        inputs = dict(input_ids=ids, position_ids=torch.arange(start, start + 2, device=param.device)[None],
                      use_cache=True, **{cache_kwarg(model): recorder})
        if start and types:  # also learn whether {layer type: 4D mask} is understood
            causal = _causal(2, impl, param.dtype, param.device)
            try:
                model(**inputs, attention_mask={t: causal for t in set(types)})
                mask_dicts = True
            except Exception:  # noqa: BLE001 - any failure means "no dict masks"; the plain run below decides
                recorder = _KeyRecorder(model.config)
                inputs[cache_kwarg(model)] = recorder
        if not recorder.seen:
            try:
                model(**inputs)
            except TypeError as error:
                raise _refuse(f"{type(model).__name__} cannot be driven with explicit position_ids and a cache ({error})") from None
        keys.append(recorder.seen)
    layers = sorted(keys[0])
    if not layers or sorted(keys[1]) != layers:
        raise _refuse(f"{type(model).__name__} does not store keys/values in the transformers Cache it is given")
    if len(layers) != len(inv_freq) or layers != list(range(len(layers))):
        raise _refuse(
            f"{type(model).__name__} updates cache layers {layers[:8]}{'...' if len(layers) > 8 else ''} for "
            f"{len(inv_freq)} decoder layers (shared or skipped key/value layers)"
        )
    tolerance = 1e-3 if param.dtype == torch.float32 else 5e-2
    for i in layers:
        k0, k1 = keys[0][i].float(), keys[1][i].float()  # (1, h, 2, d)
        if 2 * inv_freq[i].numel() > k0.shape[-1]:
            raise _refuse(f"{type(model).__name__} layer {i}: {2 * inv_freq[i].numel()} rotary dims for head dim {k0.shape[-1]}")
        cos, sin = rotation(inv_freq[i].to(k0.device), torch.tensor(float(_PROBE_SHIFT), device=k0.device))
        error = (shift_keys(k0, cos, sin) - k1).abs().max() / k0.abs().max().clamp_min(1e-12)
        if not error <= tolerance:
            raise _refuse(
                f"{type(model).__name__} layer {i}: its keys do not rotate with its rotary frequencies "
                f"(relative error {float(error):.2g} after a shift of {_PROBE_SHIFT} positions): not standard RoPE "
                "(e.g. ALiBi, an interleaved rotary layout or absolute positions), so cached tokens cannot be moved"
            )
    return layers, mask_dicts


_UNTESTED = {"gpt_neox": "rotates part of each head (partial rotary, rotary_pct) and fails inside the sink cache"}
"""Families that pass the structural checks but are known not to stream, with the reason."""


def _spec(model: nn.Module, no_rope_fix: str | None = None) -> StreamSpec:
    arch = type(model).__name__
    config = model.config
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or getattr(config, "is_encoder_decoder", False):
        raise _refuse(f"{arch} is not a causal language model")
    if config.model_type in _UNTESTED:
        raise _refuse(f"{arch} {_UNTESTED[config.model_type]}; the sink cache does not support it yet")
    impl = config._attn_implementation
    converted = getattr(config, "sinkless_attention", None)
    variant = converted.get("variant") if isinstance(converted, dict) else None
    if variant is not None and variant != "softmax":  # a `train-attn` model: sdpa would silently turn it back into softmax
        raise _refuse(f"{arch} was trained with {variant} attention (`sinkless train-attn`); the sink cache streams softmax attention only",
                      fix="measure it with `sinkless ppl --mode full` (or compare-attn), or stream a softmax model")
    if impl not in MASK_KINDS:
        raise _refuse(f"streaming needs sdpa or eager attention, and {arch} uses {impl!r}", fix="model.set_attn_implementation('sdpa') (or 'eager')")
    buffers = _rotary_buffers(model)
    if not buffers:
        raise _refuse(
            f"{arch} has no rotary position embeddings (it adds absolute position embeddings to its inputs), "
            "so cached tokens cannot be given new positions as StreamingLLM needs",
            fix=no_rope_fix or "use a rotary model (Llama family incl. SmolLM2, Qwen, Mistral, Gemma, Phi3), or --mode full / recompute",
        )
    n = int(config.num_hidden_layers)
    types = _layer_types(config)
    if types is not None and (len(types) < n or set(types[:n]) - set(_LAYER_TYPES)):
        raise _refuse(f"{arch} has layer types {sorted(set(types))}; streaming handles {', '.join(_LAYER_TYPES)}")
    rope = _rope_types(config)
    inv_freq, sliding = [], []
    for i in range(n):
        kind = types[i] if types else "full_attention"
        rope_type = rope.get(kind, rope.get("", "default"))
        if rope_type not in STATIC_ROPE:
            raise _refuse(
                f"{arch} uses {rope_type!r} rotary scaling, whose frequencies change with the sequence length",
                fix=f"streaming supports rope types {', '.join(STATIC_ROPE)}",
            )
        name = f"{kind}_inv_freq" if f"{kind}_inv_freq" in buffers else "inv_freq"
        if name not in buffers:
            raise _refuse(f"{arch}: no rotary frequencies for its {kind} layers (buffers: {sorted(buffers)})")
        inv_freq.append(buffers[name])
        window = getattr(config, "sliding_window", None)
        sliding.append(int(window) if window and (kind == "sliding_attention" or types is None) else None)
    groups: dict[int, torch.Tensor] = {}  # one float32 CPU copy per distinct buffer
    inv_freq = [groups.setdefault(id(f), f.detach().float().cpu()) for f in inv_freq]
    _, mask_dicts = _probe(model, inv_freq, types, impl)
    return StreamSpec(arch, tuple(inv_freq), tuple(sliding), tuple(types[:n] if types else ["full_attention"] * n), mask_dicts, impl)


def check_streamable(model: nn.Module, sinks: int = 4, window: int = 1020, *, no_rope_fix: str | None = None) -> StreamSpec:
    """Raise a ``SinklessError`` unless ``model`` can stream with ``sinks`` + ``window``; return what the cache needs.

    ``no_rope_fix``: the fix line for a model without rotary embeddings, for callers without ``--mode``
    (``sinkless stream``).

    ``window`` counts as in the paper and in transformers' former SinkCache: each new token attends to the
    ``sinks``, the last ``window`` tokens before it and itself; ``sinks + window`` tokens are kept between steps.
    """
    for name, value in (("sinks", sinks), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SinklessError(f"--{name} must be a whole number, got {value!r}")
    if sinks < 0 or window < 1:
        raise SinklessError(f"bad cache size: sinks={sinks}, window={window}", fix="use --sinks >= 0 and --window >= 1 (the paper: --sinks 4 --window 1020)")
    key = (model.config._attn_implementation, next(model.parameters()).dtype, next(model.parameters()).device)
    cached = _SPECS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _spec(model, no_rope_fix))
        _SPECS[model] = cached
    spec = cached[1]
    narrow = {w for w in spec.sliding if w is not None and w <= sinks + window}
    if narrow and len(narrow | {w if w in narrow else None for w in spec.sliding}) > 1 and not spec.mask_dicts:
        raise SinklessError(
            f"{spec.arch} has sliding-window layers of {min(narrow)} tokens next to other layers, and does not take "
            "one attention mask per layer type, which a cache larger than that window needs",
            fix=f"use --sinks + --window < {min(narrow)}",
        )
    return spec
