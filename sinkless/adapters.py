"""Per-family tables that tell sinkless where things are inside an unmodified Hugging Face model.

An adapter names the list of transformer blocks, the MLP down projection (its *input* is the MLP
hidden activation: after the nonlinearity and any gating, before projecting back to the residual
stream), the attention module (whose output element 1 holds the attention probabilities under eager
attention), the final norm and the token layout. Nothing here runs a model: the rest of the library
turns these names into hook sites (TransformerLens bridge tables, nnsight rename maps).
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

__all__ = [
    "Modality",
    "Adapter",
    "TokenLayout",
    "ADAPTERS",
    "adapter_for",
    "supported_architectures",
    "eager_attention",
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
    attention: str  # in a block: module returning (output, attention probabilities)
    mlp_out: str  # in a block: the MLP down projection; its input is the MLP hidden activation
    final_norm: str | None  # applied to the last residual stream (None: post-norm models like BERT)
    n_cls: int = 0
    registers_attr: str | None = None  # config attribute holding the number of trained registers
    causal: bool = False
    rotary: bool = False  # positions enter through rotary embeddings inside attention
    patch_embed: str | None = None  # vision: module whose output is the patch embeddings (before positions)
    prefixes: tuple[str, ...] = ("",)  # where ``blocks``/``final_norm`` may sit across transformers 5.x releases
    qkv: tuple[str, str, str] | None = None  # in a block: the query, key and value projections (None: fused or unknown)

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
        return f"{self.block(layer)}.{self.mlp_out}:input"

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
        down = model.get_submodule(f"{self.block(layer)}.{self.mlp_out}")
        weight = down.weight
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
        return weight.shape[0] if type(down).__name__ == "Conv1D" else weight.shape[1]

    def down_proj(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(f"{self.block(layer)}.{self.mlp_out}")

    def n_registers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.registers_attr, 0) or 0) if self.registers_attr else 0

    def patch_size(self, model: nn.Module) -> int:
        size = model.config.patch_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def layout(self, model: nn.Module, n_tokens: int, image_hw: tuple[int, int] | None = None) -> TokenLayout:
        """The token layout of a sequence of ``n_tokens`` (for vision, of an image of ``image_hw`` pixels)."""
        n_reg = self.n_registers(model)
        grid = None
        if self.modality is Modality.VISION:
            if image_hw is None:
                side = round((n_tokens - self.n_cls - n_reg) ** 0.5)
                grid = (side, side)
            else:
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
    return sorted(_BY_ARCHITECTURE)


def adapter_for(model_or_class: nn.Module | str) -> Adapter:
    """The adapter for a model (bound to its layout) or HF class name; a clear error lists the supported ones."""
    name = model_or_class if isinstance(model_or_class, str) else type(model_or_class).__name__
    try:
        adapter = _BY_ARCHITECTURE[name]
    except KeyError:
        raise SinklessError(
            f"unsupported architecture {name!r}",
            fix=f"sinkless supports: {', '.join(supported_architectures())}",
        ) from None
    return adapter if isinstance(model_or_class, str) else adapter.bind(model_or_class)


def _configs(model: nn.Module) -> list:
    return [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Switch a HF model to eager attention (which returns probabilities) and back on exit."""
    before = [(c, c._attn_implementation) for c in _configs(model)]
    if all(impl == "eager" for _, impl in before):
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        top = before[0][1] if before else None
        if top is not None:
            model.set_attn_implementation(top)
        for config, impl in before:  # sub-configs that differed from the top one
            if config._attn_implementation != impl:
                config._attn_implementation_internal = impl
