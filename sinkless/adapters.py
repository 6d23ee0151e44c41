"""Per-family tables that tell sinkless where things are inside an unmodified Hugging Face model.

An adapter names the list of transformer blocks, the MLP down projection (its *input* is the MLP
hidden activation: after the nonlinearity and any gating, before projecting back to the residual
stream), the attention module (whose output element 1 holds the attention probabilities under eager
attention), the final norm and the token layout. Nothing here runs a model: the rest of the library
turns these names into hook sites (TransformerLens bridge tables, nnsight rename maps).

``adapter_for(model)`` reads any model by its structure (``sinkless.structure``); the explicit
table ``ADAPTERS`` is kept for the families named there and overrides what structure would say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sinkless.errors import SinklessError
from sinkless.structure import GATE_PER_HEAD_HALVES, infer, linear_shape

__all__ = [
    "Modality",
    "Adapter",
    "TokenLayout",
    "ADAPTERS",
    "adapter_for",
    "supported_architectures",
    "eager_attention",
    "attention_implementation",
    "rope_scaled",
]


class Modality(str, enum.Enum):
    VISION = "vision"
    TEXT = "text"


@dataclass(frozen=True)
class TokenLayout:
    """Which positions of a sequence are CLS, registers, patches (vision) or text tokens.

    Order along the sequence: ``[cls × n_cls, registers × n_registers, body..., appended × n_appended]``
    where *body* is the patch grid (row-major) for vision and the text tokens for language models,
    and *appended* are extra tokens an intervention added at the end (e.g. test-time registers).
    """

    n_tokens: int
    n_cls: int = 0
    n_registers: int = 0
    grid: tuple[int, int] | None = None
    n_appended: int = 0

    @property
    def body(self) -> slice:
        """Patch tokens (vision) or text tokens (language), without CLS or any register."""
        return slice(self.n_cls + self.n_registers, self.n_tokens - self.n_appended)

    @property
    def cls(self) -> slice:
        return slice(0, self.n_cls)

    @property
    def registers(self) -> slice:
        return slice(self.n_cls, self.n_cls + self.n_registers)

    @property
    def appended(self) -> slice:
        return slice(self.n_tokens - self.n_appended, self.n_tokens)

    @property
    def n_body(self) -> int:
        return self.n_tokens - self.n_cls - self.n_registers - self.n_appended

    def with_appended(self, n: int) -> TokenLayout:
        return TokenLayout(self.n_tokens + n, self.n_cls, self.n_registers, self.grid, self.n_appended + n)

    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named token groups of ``x`` (…, N, D): cls, registers, body (patches/tokens), appended."""
        return {
            "cls": x[..., self.cls, :],
            "registers": x[..., self.registers, :],
            "body": x[..., self.body, :],
            "appended": x[..., self.appended, :],
        }


@dataclass(frozen=True)
class Adapter:
    """Where things are in one model family. Paths are relative to the model (blocks) or block."""

    family: str
    architectures: tuple[str, ...]  # HF class names served, e.g. ("Dinov2Model",)
    modality: Modality
    blocks: str  # ModuleList of transformer blocks
    attention: str  # in a block: module returning (output, attention probabilities); some blocks may lack it
    mlp_out: str | None  # in a block: the MLP down projection, whose input is the MLP hidden activation (None: experts)
    final_norm: str | None  # applied to the last residual stream (None: post-norm models like BERT)
    n_cls: int = 0
    registers_attr: str | None = None  # config attribute holding the number of trained registers
    causal: bool = False
    rotary: bool = False  # positions enter through rotary embeddings inside attention
    patch_embed: str | None = None  # vision: module whose output is the patch embeddings (before positions)
    prefixes: tuple[str, ...] = ("",)  # where ``blocks``/``final_norm`` may sit across transformers 5.x releases
    qkv: tuple[str, str, str] | None = None  # in a block: the query, key and value projections (None: fused or unknown)
    gate: str | None = None  # gated attention: how the query projection carries the output gate (structure.GATE_*)
    sinks: str | None = None  # in a block: per-head learned sink logits (gpt-oss), whose share eager probabilities leave out
    inferred: bool = False  # read from the module tree rather than the explicit table

    def bind(self, model: nn.Module) -> Adapter:
        """This adapter with paths resolved against ``model`` (e.g. older releases nest ``vision_model.``)."""
        for prefix in self.prefixes:
            try:
                model.get_submodule(prefix + self.blocks)
            except AttributeError:
                continue
            if not prefix:
                return self
            norm = None if self.final_norm is None else prefix + self.final_norm
            embed = None if self.patch_embed is None else prefix + self.patch_embed
            return dataclasses.replace(
                self, blocks=prefix + self.blocks, final_norm=norm, patch_embed=embed, prefixes=("",)
            )
        raise SinklessError(
            f"{type(model).__name__} has no block list at {self.blocks!r} (tried prefixes {list(self.prefixes)})",
            fix="this transformers release lays the model out differently; please report it with `pip show transformers`",
        )

    def has_attention(self, model: nn.Module, layer: int) -> bool:
        """Whether block ``layer`` holds softmax attention (Qwen3-Next's linear-attention blocks do not)."""
        try:
            model.get_submodule(f"{self.block(layer)}.{self.attention}")
        except AttributeError:
            return False
        return True

    def _dense_mlp(self) -> str:
        if self.mlp_out is None:
            raise SinklessError(
                f"the {self.family} MLP is a mixture of experts: it has no single down projection whose neurons sinkless could read or move",
                fix="scan works on it; test-time registers need a model with a dense MLP",
            )
        return self.mlp_out

    # -- hook sites --------------------------------------------------------------------------
    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def residual_site(self, layer: int) -> str:
        """The residual stream after block ``layer`` (before any final norm)."""
        return f"{self.block(layer)}:output"

    def block_input_site(self, layer: int = 0) -> str:
        """The residual stream entering block ``layer`` (layer 0: the embeddings)."""
        return f"{self.block(layer)}:input"

    def patch_embed_site(self) -> str:
        """Vision: the patch embeddings before position embeddings, (B, N, D) or (B, D, h, w)."""
        if self.patch_embed is None:
            raise ValueError(f"{self.family} has no patch embedding")
        return f"{self.patch_embed}:output"

    def mlp_hidden_site(self, layer: int) -> str:
        return f"{self.block(layer)}.{self._dense_mlp()}:input"

    def attention_site(self, layer: int) -> str:
        return f"{self.block(layer)}.{self.attention}:output[1]"

    def qkv_site(self, layer: int, which: str) -> str:
        """Output of the ``"query"``, ``"key"`` or ``"value"`` projection of block ``layer``: (B, N, heads·head_dim)."""
        names = ("query", "key", "value")
        if which not in names:
            raise ValueError(f"which must be one of {names}, got {which!r}")
        if self.qkv is None:
            raise SinklessError(
                f"the {self.family} adapter names no separate query/key/value projections",
                fix="use a model family with q/k/v projection modules (DINOv2, ViT, CLIP, SigLIP)",
            )
        return f"{self.block(layer)}.{self.qkv[names.index(which)]}:output"

    def key_site(self, layer: int) -> str:
        return self.qkv_site(layer, "key")

    def query_site(self, layer: int) -> str:
        return self.qkv_site(layer, "query")

    def value_site(self, layer: int) -> str:
        return self.qkv_site(layer, "value")

    # -- structure ---------------------------------------------------------------------------
    def num_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.blocks))

    def mlp_width(self, model: nn.Module, layer: int = 0) -> int:
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
        return linear_shape(self.down_proj(model, layer))[0]

    def down_proj(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(f"{self.block(layer)}.{self._dense_mlp()}")

    def split_query_gate(self, query: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated attention: the query projection's output (B, N, H·2d) -> query (B, N, H·d), gate logits (B, N, H·d)."""
        if self.gate != GATE_PER_HEAD_HALVES:
            raise ValueError(f"{self.family} has no output gate in its query projection")
        b, n, _ = query.shape
        q, g = query.view(b, n, -1, 2 * head_dim).chunk(2, dim=-1)  # (B, N, H, d) each
        return q.reshape(b, n, -1), g.reshape(b, n, -1)

    def n_registers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.registers_attr, 0) or 0) if self.registers_attr else 0

    def patch_size(self, model: nn.Module) -> int:
        size = model.config.patch_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def layout(
        self, model: nn.Module, n_tokens: int, image_hw: tuple[int, int] | None = None, *, grid: tuple[int, int] | None = None
    ) -> TokenLayout:
        """The token layout of a sequence of ``n_tokens`` (for vision, of an image of ``image_hw`` pixels,
        or of a patch ``grid`` given directly); tokens beyond the grid count as appended (padding, registers)."""
        n_reg = self.n_registers(model)
        if self.modality is Modality.VISION:
            if grid is None and image_hw is None:
                side = round((n_tokens - self.n_cls - n_reg) ** 0.5)
                grid = (side, side)
            elif grid is None:
                p = self.patch_size(model)
                grid = (image_hw[0] // p, image_hw[1] // p)
            expected = self.n_cls + n_reg + grid[0] * grid[1]
            if n_tokens < expected:
                raise ValueError(f"{n_tokens} tokens cannot hold a {grid} patch grid plus prefix tokens")
            return TokenLayout(n_tokens, self.n_cls, n_reg, grid, n_appended=n_tokens - expected)
        return TokenLayout(n_tokens, self.n_cls, n_reg)


_V = Modality.VISION
_T = Modality.TEXT

ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in (
        Adapter(
            "dinov2",
            ("Dinov2Model",),
            _V,
            "encoder.layer",
            "attention",
            "mlp.fc2",
            "layernorm",
            n_cls=1,
            patch_embed="embeddings.patch_embeddings",
            qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        ),
        Adapter(
            "dinov2_with_registers",
            ("Dinov2WithRegistersModel",),
            _V,
            "encoder.layer",
            "attention",
            "mlp.fc2",
            "layernorm",
            n_cls=1,
            registers_attr="num_register_tokens",
            patch_embed="embeddings.patch_embeddings",
            qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        ),
        Adapter(
            "vit", ("ViTModel",), _V, "layers", "attention", "mlp.fc2", "layernorm", n_cls=1,
            patch_embed="embeddings.patch_embeddings",
            registers_attr="num_register_tokens",  # set by sinkless.registers.add_registers
            qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        ),
        Adapter(
            "clip_vision",
            ("CLIPVisionModel",),
            _V,
            "encoder.layers",
            "self_attn",
            "mlp.fc2",
            "post_layernorm",
            n_cls=1,
            patch_embed="embeddings.patch_embedding",
            registers_attr="num_register_tokens",  # set by sinkless.registers.add_registers
            prefixes=("", "vision_model."),
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ),
        Adapter(
            "siglip_vision",
            ("SiglipVisionModel",),
            _V,
            "encoder.layers",
            "self_attn",
            "mlp.fc2",
            "post_layernorm",
            patch_embed="embeddings.patch_embedding",
            registers_attr="num_register_tokens",  # set by sinkless.registers.add_registers
            prefixes=("", "vision_model."),
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ),
        Adapter(
            "llama",
            ("LlamaForCausalLM",),
            _T,
            "model.layers",
            "self_attn",
            "mlp.down_proj",
            "model.norm",
            causal=True,
            rotary=True,
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ),
        Adapter(
            "qwen3",
            ("Qwen3ForCausalLM",),
            _T,
            "model.layers",
            "self_attn",
            "mlp.down_proj",
            "model.norm",
            causal=True,
            rotary=True,
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ),
        Adapter("gpt2", ("GPT2LMHeadModel",), _T, "transformer.h", "attn", "mlp.c_proj", "transformer.ln_f", causal=True),
        Adapter("bert", ("BertModel",), _T, "encoder.layer", "attention.self", "output.dense", None, n_cls=1,
                qkv=("attention.self.query", "attention.self.key", "attention.self.value")),
    )
}

_BY_ARCHITECTURE = {arch: a for a in ADAPTERS.values() for arch in a.architectures}


def supported_architectures() -> list[str]:
    """HF class names of the explicit table (any other model is read by its structure)."""
    return sorted(_BY_ARCHITECTURE)


def adapter_for(model_or_class: nn.Module | str) -> Adapter:
    """The adapter for a model (the table's entry bound to its layout, else read from its structure) or HF class name.

    Unsupported models raise a ``SinklessError`` naming what sinkless looked for and did not find.
    """
    if isinstance(model_or_class, str):
        try:
            return _BY_ARCHITECTURE[model_or_class]
        except KeyError:
            raise SinklessError(
                f"unsupported architecture {model_or_class!r}",
                fix=f"load the model to let sinkless read its structure; recognised by name: {', '.join(supported_architectures())}",
            ) from None
    model = model_or_class
    adapter = _BY_ARCHITECTURE.get(type(model).__name__)
    if adapter is not None:
        try:
            return adapter.bind(model)
        except SinklessError:
            pass  # a release that moved things: read the structure instead
    return infer(model)


def _configs(model: nn.Module) -> list:
    """Every config (and sub-config) the model's modules read their attention implementation from."""
    seen, configs = set(), []
    pending = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    while pending:
        config = pending.pop(0)
        if id(config) in seen:
            continue
        seen.add(id(config))
        configs.append(config)
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if hasattr(sub, "_attn_implementation"):
                pending.append(sub)
    return configs


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run ``model`` with attention implementation ``name`` ("eager", or one registered with transformers'
    ``AttentionInterface``) and restore every config's own setting on exit, exception or not.

    Attention modules read ``config._attn_implementation`` at each call, so setting it is the switch
    (``set_attn_implementation`` does the same plus checks that would refuse sub-modules such as a
    CLIPModel's vision tower).
    """
    before = [(c, c._attn_implementation_internal) for c in _configs(model)]
    try:
        for config, _ in before:
            config._attn_implementation_internal = name
        yield model
    finally:
        for config, impl in before:
            config._attn_implementation_internal = impl


def eager_attention(model: nn.Module):
    """Switch a HF model to eager attention (which returns probabilities) and back on exit."""
    return attention_implementation(model, "eager")


@contextlib.contextmanager
def rope_scaled(model: nn.Module, factor: float) -> Iterator[nn.Module]:
    """Linear rotary position interpolation (Chen et al. 2023): positions / ``factor`` while the context is on.

    Every rotary frequency buffer (``inv_freq``, Gemma3's ``*_inv_freq``) is divided by ``factor``, so a
    model trained on n positions reads ``factor`` x n tokens within its trained range; restored on exit.
    """
    if not factor or factor <= 0:
        raise SinklessError(f"rope scale must be positive, got {factor}", fix="e.g. 4 reads 4x the trained context")
    saved = []
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if name.endswith("inv_freq") and not name.endswith("original_inv_freq") and buffer is not None:
                saved.append((module, name, buffer))
    if factor != 1 and not saved:
        raise SinklessError(f"{type(model).__name__} has no rotary position embeddings to scale", fix="drop --rope-scale")
    try:
        for module, name, buffer in saved:
            module._buffers[name] = buffer / factor
        yield model
    finally:
        for module, name, buffer in saved:
            module._buffers[name] = buffer
