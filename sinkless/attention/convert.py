"""Convert an unmodified Hugging Face model's attention to a sink-free variant, and save / reload it.

Nothing here copies a model's ``forward``. Every supported family (Llama, Qwen3, Dinov2, ViT) calls
its attention kernel through transformers 5's ``AttentionInterface`` and has ``q_proj`` / ``o_proj``
linears, so a conversion is three small moves:

- the kernel: each variant of ``sinkless.attention.functions`` is registered as an attention
  implementation (``sinkless_softmax``, ``sinkless_sigmoid``, ...; with the SDPA mask builder) and the
  model is switched to it with ``set_attn_implementation``;
- new weights: a per-head ``sinks`` parameter (sink logit) or a ``gate_proj`` linear (gated
  attention, G1 of Qiu et al. 2025) added to each attention module, so ``state_dict``/``save_pretrained``
  carry them;
- the gate: two persistent ``sinkless.hooks`` edits per layer: the input of ``q_proj`` *is* the
  block's normalised input X, so the gate sigmoid(X·W_g) is computed there, and it multiplies the
  input of ``o_proj`` (the merged per-head outputs), i.e. each head's output before the projection.

``convert`` returns a handle whose ``.remove()`` puts the model back as it was. ``init="preserve"``
starts as close to the original as the variant allows: a sink logit far below every row's
log-sum-exp; a gate with zero weights (sigmoid = ½ everywhere) whose ½ is folded into ``o_proj`` as an
exact ×2, so a converted model reproduces the original to float rounding. ``init="random"`` is for
training from scratch (gate weights N(0, initializer_range), the reference init; sink logits 0).
The conversion settings are written to ``config.sinkless_attention``; ``load`` rebuilds the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sinkless.adapters import Adapter, adapter_for
from sinkless.attention import functions as fn
from sinkless.errors import SinklessError
from sinkless.hooks import Hooks

__all__ = [
    "VARIANTS",
    "CONVERTIBLE",
    "AttentionSpec",
    "Conversion",
    "convert",
    "attention_modules",
    "attention_probabilities",
    "converted_spec",
    "load",
    "register_functions",
]

VARIANTS = ("softmax", "sigmoid", "elu1", "elu1norm", "gated", "sinklogit")
CONVERTIBLE = ("llama", "qwen3", "dinov2", "dinov2_with_registers", "vit")
GATES = ("elementwise", "headwise")
PRESERVE_SINK_LOGIT = -20.0  # init="preserve": sigmoid(lse + 20) ≈ 1 for every row (SmolLM2: max logit change 7e-4)
CONFIG_KEY = "sinkless_attention"


@dataclass(frozen=True)
class AttentionSpec:
    """Which variant a converted model runs, with its settings (stored in ``config.sinkless_attention``)."""

    variant: str = "softmax"
    sigmoid_bias: float | None = None  # sigmoid: fixed b; None: −ln(number of keys) at every call
    gate: str = "elementwise"  # gated: elementwise (H·d gates) or headwise (H gates)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SinklessError(f"unknown attention variant {self.variant!r}", fix=f"choose one of {', '.join(VARIANTS)}")
        if self.gate not in GATES:
            raise SinklessError(f"unknown gate {self.gate!r}", fix=f"choose one of {', '.join(GATES)}")
        if self.sigmoid_bias is not None and not math.isfinite(self.sigmoid_bias):
            raise SinklessError(f"sigmoid bias must be a finite number, got {self.sigmoid_bias}")

    @property
    def implementation(self) -> str:
        """The registered attention implementation (gated attention runs softmax plus the gate hooks)."""
        return f"sinkless_{'softmax' if self.variant == 'gated' else self.variant}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AttentionSpec:
        known = {k: data[k] for k in ("variant", "sigmoid_bias", "gate") if k in data}
        return cls(**known)


# -- the kernels, as transformers attention implementations ----------------------------------------
def _hf_attention(variant: str):
    """An ``AttentionInterface`` function: HF's call convention around one function of ``functions``."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        # query (B, H, T, d); key, value (B, H_kv, S, d); mask: SDPA-style boolean (B, 1, T, S) or None
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if causal and kv_len > q_len:  # HF's convention for a prefill into an empty static cache
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        want = bool(kwargs.get("output_attentions") or getattr(module, "_sinkless_probs", False))
        common = {"attention_mask": attention_mask, "is_causal": causal, "scale": scaling, "return_probs": want}
        if variant == "softmax":
            result = fn.softmax_attention(query, key, value, dropout=dropout, **common)
        elif variant == "sigmoid":
            result = fn.sigmoid_attention(query, key, value, bias=getattr(module, "sinkless_sigmoid_bias", None), **common)
        elif variant in ("elu1", "elu1norm"):
            result = fn.elu1_attention(query, key, value, normalize=variant == "elu1norm", **common)
        else:
            result = fn.sink_logit_attention(query, key, value, module.sinks, **common)
        out, probs = result if want else (result, None)
        return out.transpose(1, 2).contiguous(), probs  # (B, T, H, d), (B, H, T, S) | None

    forward.__name__ = f"sinkless_{variant}_attention"
    return forward


_REGISTERED = False


def register_functions() -> None:
    """Register every variant with transformers' ``AttentionInterface`` (and the SDPA mask builder). Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for variant in VARIANTS:
        if variant == "gated":
            continue
        AttentionInterface.register(f"sinkless_{variant}", _hf_attention(variant))
        AttentionMaskInterface.register(f"sinkless_{variant}", sdpa_mask)
    _REGISTERED = True


# -- finding the attention modules -------------------------------------------------------------------
def _adapter(model: nn.Module) -> Adapter:
    adapter = adapter_for(model)
    if adapter.family not in CONVERTIBLE:
        raise SinklessError(
            f"{type(model).__name__} ({adapter.family}) cannot be converted: its attention has no q_proj/o_proj "
            "pair dispatched through transformers' AttentionInterface",
            fix=f"convert a model of one of these families: {', '.join(CONVERTIBLE)}",
        )
    return adapter


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every attention module of a convertible model, in layer order."""
    adapter = _adapter(model)
    found = []
    for layer in range(adapter.num_layers(model)):
        path = f"{adapter.block(layer)}.{adapter.attention}"
        module = model.get_submodule(path)
        if not all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "o_proj")):
            raise SinklessError(
                f"{path} ({type(module).__name__}) has no q_proj/o_proj linears",
                fix="this transformers release lays the attention out differently; please report it with `pip show transformers`",
            )
        found.append((path, module))
    return found


def _heads(module: nn.Module) -> tuple[int, int]:
    """(query heads, head dim) of an attention module."""
    head_dim = int(module.head_dim)
    return module.q_proj.out_features // head_dim, head_dim


def converted_spec(model: nn.Module) -> AttentionSpec | None:
    """The spec a model was converted with (from ``config.sinkless_attention``), None for a plain model."""
    data = getattr(model.config, CONFIG_KEY, None)
    return AttentionSpec.from_dict(data) if data else None


# -- the gate (G1) ------------------------------------------------------------------------------------
class _Gate:
    """The gate of one attention module: computed at q_proj's input, applied at o_proj's input."""

    def __init__(self, module: nn.Module, headwise: bool) -> None:
        self.module = module
        self.heads, self.head_dim = _heads(module)
        self.headwise = headwise
        self.gate: torch.Tensor | None = None

    def compute(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D), the block's normalised input
        logits = self.module.gate_proj(x)  # (B, T, H) or (B, T, H·d)
        self.gate = torch.sigmoid(logits)
        return x

    def apply(self, merged: torch.Tensor) -> torch.Tensor:  # merged: (B, T, H·d), heads side by side
        gate, self.gate = self.gate, None
        if gate is None:
            raise RuntimeError("gated attention: o_proj ran without q_proj (the gate needs the block input)")
        if self.headwise:
            gate = gate.repeat_interleave(self.head_dim, dim=-1)  # (B, T, H) -> (B, T, H·d)
        return merged * gate.to(merged.dtype)


# -- converting -----------------------------------------------------------------------------------------
class Conversion:
    """A converted model's handle: ``.spec``; ``.remove()`` restores the original model (idempotent)."""

    def __init__(self, model: nn.Module, spec: AttentionSpec) -> None:
        self.model = model
        self.spec = spec
        self._undo: list = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    @property
    def attached(self) -> bool:
        return bool(self._undo)


def _set_attr(conversion: Conversion, obj, name: str, value) -> None:
    missing = object()
    before = getattr(obj, name, missing)
    setattr(obj, name, value)

    def undo() -> None:
        if before is missing:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        else:
            setattr(obj, name, before)

    conversion._undo.append(undo)


def convert(
    model: nn.Module,
    variant: str | AttentionSpec,
    *,
    init: str = "preserve",
    sigmoid_bias: float | None = None,
    gate: str = "elementwise",
    sink_init: float | None = None,
    generator: torch.Generator | None = None,
) -> Conversion:
    """Switch ``model``'s attention to ``variant`` in place; returns a handle with ``.remove()``.

    ``init``: ``"preserve"`` (start as close to the original as the variant allows), ``"random"``
    (fresh parameters for training from scratch) or ``"none"`` (new parameters left at zero, to be
    loaded from a checkpoint). ``sink_init`` overrides the initial sink logit.
    """
    spec = variant if isinstance(variant, AttentionSpec) else AttentionSpec(variant, sigmoid_bias, gate)
    if init not in ("preserve", "random", "none"):
        raise SinklessError(f"unknown init {init!r}", fix="choose preserve, random or none")
    if converted_spec(model) is not None:
        raise SinklessError("this model is already converted", fix="remove() the first conversion, or load the original model")
    modules = attention_modules(model)
    register_functions()
    conversion = Conversion(model, spec)
    try:
        _attach(conversion, model, modules, spec, init, sink_init, generator)
    except BaseException:
        conversion.remove()
        raise
    return conversion


def _attach(conversion, model, modules, spec, init, sink_init, generator) -> None:
    before = model.config._attn_implementation
    model.set_attn_implementation(spec.implementation)
    conversion._undo.append(lambda: model.set_attn_implementation(before or "sdpa"))
    _set_attr(conversion, model.config, CONFIG_KEY, spec.to_dict())
    edits = {}
    for path, module in modules:
        heads, head_dim = _heads(module)
        weight = module.q_proj.weight
        if spec.variant == "sigmoid":
            _set_attr(conversion, module, "sinkless_sigmoid_bias", spec.sigmoid_bias)
        elif spec.variant == "sinklogit":
            start = sink_init if sink_init is not None else (PRESERVE_SINK_LOGIT if init == "preserve" else 0.0)
            sinks = nn.Parameter(torch.full((heads,), float(start), dtype=weight.dtype, device=weight.device))
            _set_attr(conversion, module, "sinks", sinks)
        elif spec.variant == "gated":
            width = heads if spec.gate == "headwise" else heads * head_dim
            proj = nn.Linear(module.q_proj.in_features, width, bias=False, dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                if init == "random":
                    std = float(getattr(model.config, "initializer_range", 0.02))
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * std)
                else:
                    proj.weight.zero_()
                if init == "preserve":  # sigmoid(0) = 1/2 everywhere: fold the exact x2 into o_proj
                    module.o_proj.weight.mul_(2.0)
                    conversion._undo.append(lambda o=module.o_proj: o.weight.data.mul_(0.5))
            _set_attr(conversion, module, "gate_proj", proj)
            state = _Gate(module, spec.gate == "headwise")
            edits[f"{path}.q_proj:input"] = state.compute
            edits[f"{path}.o_proj:input"] = state.apply
    if edits:
        hooks = Hooks(model, edit=edits)
        conversion._undo.append(hooks.remove)


@contextlib.contextmanager
def attention_probabilities(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, converted attention modules return their weights as output element 1.

    They are then captured at ``adapter.attention_site(i)`` like eager attention's, for every variant
    (sigmoid and ELU+1 rows are the raw, unnormalised weights).
    """
    if converted_spec(model) is None:
        raise SinklessError("attention_probabilities needs a converted model", fix="call sinkless.attention.convert(model, 'softmax') first")
    modules = [m for _, m in attention_modules(model)]
    for module in modules:
        module._sinkless_probs = True
    try:
        yield model
    finally:
        for module in modules:
            with contextlib.suppress(AttributeError):
                del module._sinkless_probs


# -- save / reload ------------------------------------------------------------------------------------
def load(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Reload a model saved with ``save_pretrained`` after ``convert``: a ``sinkless.zoo.Loaded``, converted again.

    The base weights load with the class named in ``config.architectures``; the variant's own weights
    (``sinks``, ``gate_proj``) are read from the folder's safetensors; a tokenizer is loaded when the
    folder has one. A folder without ``sinkless_attention`` in its config loads as a plain model.
    """
    import transformers
    from safetensors import safe_open

    from sinkless.adapters import Modality
    from sinkless.images import IMAGENET_MEAN, IMAGENET_STD, ImageSpec
    from sinkless.zoo import Loaded, _quiet_transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SinklessError(f"{folder} is not a saved model (no config.json)", fix="pass a folder written by save_pretrained / train-attn (OUT/model)")
    with _quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(folder)
        arch = (config.architectures or [""])[0]
        adapter = adapter_for(arch)
        model = getattr(transformers, arch).from_pretrained(folder, dtype=dtype).eval()
        tokenizer = None
        if adapter.modality is Modality.TEXT and (folder / "tokenizer_config.json").is_file():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    adapter = adapter.bind(model)
    spec_image = None
    if adapter.modality is Modality.VISION:
        spec_image = ImageSpec(size=int(config.image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD, patch_size=adapter.patch_size(model))
    loaded = Loaded(str(folder), model, adapter, spec_image, tokenizer, source=str(folder))
    spec = converted_spec(model)
    if spec is None:
        return loaded
    delattr(model.config, CONFIG_KEY)
    convert(model, spec, init="none")
    paths = tuple(f"{path}." for path, _ in attention_modules(model))
    wanted = {name for name in model.state_dict() if name.startswith(paths) and name.endswith((".sinks", ".gate_proj.weight"))}
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in wanted & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    missing = sorted(wanted - set(found))
    if missing:
        raise SinklessError(
            f"{folder} is a {spec.variant} model but its weights lack {missing[0]} (and {len(missing) - 1} more)",
            fix="save the converted model with save_pretrained after convert(), not before",
        )
    model.load_state_dict(found, strict=False)
    model.to(device=device, dtype=dtype)
    loaded.info["attention"] = spec.to_dict()
    return loaded
