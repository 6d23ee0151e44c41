"""Recognise a transformer by its structure: where its blocks, attention, MLP and final norm are.

Hugging Face families differ in names (``model.layers`` / ``transformer.h`` / ``encoder.layer``,
``down_proj`` / ``fc2`` / ``c_proj`` / ``dense_4h_to_h``) but not in shape: a transformer is a list
of identical blocks, each holding an attention module that owns the query/key/value projections
and an MLP whose down projection maps the hidden width back to the residual width. ``infer``
reads that shape from the module tree and the config (TransformerLens' bridge tables and nnsight's
rename maps, derived instead of written by hand), so a family sinkless has never seen (Mistral,
Gemma, Phi-3, GPT-NeoX, OPT, Falcon, gpt-oss, Qwen3-Next, DINOv3, SigLIP2, CLIP text, ...) works
without an entry in ``adapters.ADAPTERS``; the table stays for overrides.

Two attention variants are read as well: a learned per-head sink logit (gpt-oss: a ``sinks``
parameter; its eager probabilities leave the sink's share out, so rows sum to less than one), and
the output gate of gated attention (Qwen3-Next: the query projection emits, per head, the query
followed by the gate; the attention output is multiplied by ``sigmoid(gate)``).
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from sinkless.errors import SinklessError

__all__ = ["infer", "backbone", "linear_shape", "hidden_size", "GATE_PER_HEAD_HALVES"]

GATE_PER_HEAD_HALVES = "per_head_halves"
"""Gate layout of HF Qwen3-Next: the query projection's output, viewed per head, is ``[query_h | gate_h]``."""

# (query, key, value) child names of an attention module, most common first
_QKV_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("wq", "wk", "wv"),
    ("q_lin", "k_lin", "v_lin"),
    ("query_proj", "key_proj", "value_proj"),
)
_FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "qkv", "Wqkv", "in_proj", "qkv_linear")
# names of MLP down projections, used only to break ties
_DOWN_HINTS = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "output.dense", "wo", "fc_out", "w2", "lin2", "proj_out")
_MOE = re.compile(r"(experts|moe|mixture)", re.IGNORECASE)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear and its subclasses, and GPT-2's Conv1D (a linear layer storing its weight transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    weight = module.weight
    if type(module).__name__ == "Conv1D":  # (in, out)
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def hidden_size(model: nn.Module) -> int | None:
    """The residual-stream width from the config (``hidden_size``, ``n_embd``, ``d_model``, ...)."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "width"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def backbone(model: nn.Module) -> nn.Module:
    """The module sinkless drives: the model itself, or the vision tower of a two-tower model.

    CLIPModel / SiglipModel / Siglip2Model run text and images together; their image transformer
    (``vision_model``) is the part with high-norm artifacts, and it runs on pixels alone.
    """
    vision, text = getattr(model, "vision_model", None), getattr(model, "text_model", None)
    if isinstance(vision, nn.Module) and isinstance(text, nn.Module):
        return vision
    return model


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _qkv_children(module: nn.Module) -> tuple[str, str, str] | str | None:
    """Names of the separate q/k/v projections owned by ``module``, the fused one, or None."""
    children = {name: child for name, child in module.named_children() if _is_linear(child)}
    for names in _QKV_NAMES:
        if all(n in children for n in names):
            return names
    for name in _FUSED_QKV:
        if name in children:
            return name
    return None


def _attention_paths(block: nn.Module) -> list[str]:
    """Paths (inside ``block``) of the modules that own the attention projections, shallowest first."""
    found = [name for name, module in block.named_modules() if name and _qkv_children(module) is not None]
    return sorted(found, key=lambda n: n.count("."))


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The block list: the largest ModuleList of same-class children that hold attention."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(_attention_paths(child) for child in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    return best


def _mlp_out(block: nn.Module, attention: set[str], width: int | None) -> str | None:
    """The MLP down projection inside ``block``: hidden width -> residual width, outside attention.

    None for a mixture-of-experts MLP (its experts hold stacked weights, not one projection).
    """
    for name, module in block.named_modules():
        if name and not any(name == a or name.startswith(a + ".") for a in attention):
            if _MOE.search(type(module).__name__) or name.rsplit(".", 1)[-1] == "experts":
                return None
    candidates = []
    for name, module in block.named_modules():
        if not name or not _is_linear(module) or any(name == a or name.startswith(a + ".") for a in attention):
            continue
        n_in, n_out = linear_shape(module)
        if width is not None and n_out != width:
            continue
        candidates.append((name, n_in))
    if not candidates:
        return None
    wider = [name for name, n_in in candidates if width is None or n_in != width]
    pool = wider or [name for name, _ in candidates]
    if len(pool) == 1:
        return pool[0]
    for hint in _DOWN_HINTS:
        for name in pool:
            if name == hint or name.endswith("." + hint):
                return name
    return pool[-1]


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("Norm", "RMSNorm", "LayerNorm"))


def _final_norm(model: nn.Module, blocks: str) -> str | None:
    """A norm module that is a direct child of an ancestor of the block list (not of the embeddings).

    Among several (CLIP has ``pre_layrnorm`` before and ``post_layernorm`` after the encoder), the one
    registered after the blocks' branch wins.
    """
    parts = blocks.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts))]  # "" (root), "model", ...
    before, after = [], []
    for ancestor in ancestors:
        parent = model.get_submodule(ancestor) if ancestor else model
        branch = parts[len(ancestor.split(".")) if ancestor else 0]
        seen_branch = False
        for name, child in parent.named_children():
            if name == branch:
                seen_branch = True
                continue
            if _is_norm(child) and "pre" not in name.lower():
                path = f"{ancestor}.{name}" if ancestor else name
                (after if seen_branch else before).append(path)
    if after:
        return after[0]
    return before[-1] if before else None  # OPT registers final_layer_norm before its layers


def _n_cls(model: nn.Module, vision: bool) -> int:
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cls_token", "class_embedding") and "embed" in name:
            return 1
    if not vision and any(name.endswith("token_type_embeddings") for name, _ in model.named_modules()):
        return 1  # BERT-like encoders start with [CLS]
    return 0


def _patch_embed(model: nn.Module) -> str | None:
    """Vision: the first module that cuts the image into patch embeddings (a strided conv, or SigLIP2's Linear)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == tuple(module.stride):
            return name
        if _is_linear(module) and name.endswith("patch_embedding"):
            return name
    return None


def _rotary(model: nn.Module) -> bool:
    for module in model.modules():
        if "rotary" in type(module).__name__.lower() or "rope" in type(module).__name__.lower():
            return True
        if any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False)):
            return True
    return False


def _gate(model: nn.Module, attention: nn.Module, qkv) -> str | None:
    """Qwen3-Next: a query projection twice as wide as the heads hold carries an output gate per head."""
    if not isinstance(qkv, tuple):
        return None
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if not heads or not head_dim:
        return None
    _, q_out = linear_shape(getattr(attention, qkv[0]))
    return GATE_PER_HEAD_HALVES if q_out == 2 * heads * head_dim else None


def infer(model: nn.Module, *, family: str | None = None):
    """An ``Adapter`` for ``model`` read from its structure; a ``SinklessError`` naming what is missing."""
    from sinkless.adapters import Adapter, Modality

    arch = type(model).__name__
    params = _forward_params(model)
    vision = "pixel_values" in params
    missing = []
    if not vision and "input_ids" not in params:
        missing.append("forward() taking pixel_values or input_ids")
    found = _blocks(model)
    if found is None:
        missing.append("ModuleList of transformer blocks holding attention (modules owning q/k/v projections)")
    if missing:
        raise _unsupported(arch, missing)
    blocks, block_list = found
    # the attention path may live in some blocks only (Qwen3-Next alternates linear and full attention)
    attention_paths = [p for block in block_list for p in _attention_paths(block)[:1]]
    attention = attention_paths[0]
    attention_module = next(b.get_submodule(attention) for b in block_list if _has(b, attention))
    qkv = _qkv_children(attention_module)
    width = hidden_size(model)
    reference = next(b for b in block_list if _has(b, attention))
    mlp_out = _mlp_out(reference, {attention} | set(_attention_paths(reference)), width)
    sinks = "sinks" if isinstance(getattr(attention_module, "sinks", None), nn.Parameter) else None
    config = getattr(model, "config", None)
    causal = not vision and any(getattr(m, "is_causal", False) is True for m in block_list.modules())
    return Adapter(
        family=family or getattr(config, "model_type", None) or arch,
        architectures=(arch,),
        modality=Modality.VISION if vision else Modality.TEXT,
        blocks=blocks,
        attention=attention,
        mlp_out=mlp_out,
        final_norm=_final_norm(model, blocks),
        n_cls=_n_cls(model, vision),
        registers_attr="num_register_tokens" if vision and getattr(config, "num_register_tokens", 0) else None,
        causal=causal or bool(getattr(config, "is_decoder", False)),
        rotary=_rotary(model),
        patch_embed=_patch_embed(model) if vision else None,
        qkv=tuple(f"{attention}.{n}" for n in qkv) if isinstance(qkv, tuple) else None,
        gate=_gate(model, attention_module, qkv),
        sinks=f"{attention}.{sinks}" if sinks else None,
        inferred=True,
    )


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _unsupported(arch: str, missing: list[str]) -> SinklessError:
    from sinkless.adapters import supported_architectures

    return SinklessError(
        f"unsupported architecture {arch!r}: sinkless found no {'; no '.join(missing)}",
        fix="sinkless reads decoder-only LMs, encoders and ViTs with attention blocks; recognised by name: "
        + ", ".join(supported_architectures()),
    )
