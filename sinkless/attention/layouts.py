"""The two published weight layouts of gated attention's fused query+gate projection (Qiu et al. 2025).

Both checkpoints store the gate as extra output rows of ``q_proj`` (one matmul for queries and gates);
sinkless keeps them apart (``q_proj`` with the queries, ``gate_proj`` with the gates, head-major).
The layouts differ in how the rows interleave:

- ``"reference"`` (the authors' repository, ``modeling_qwen3.py``): the projection output is viewed
  as (…, H_kv, ·) and each key/value group holds [queries of its G = H / H_kv heads (G·d) | their
  gates (G·d elementwise, or G headwise)];
- ``"qwen3_next"`` (Hugging Face's Qwen3-Next): per head [q_h (d) | g_h (d)], i.e. (…, H, 2d) chunked.
  Only elementwise gates exist in that layout (a headwise version would be [q_h | g_h] with one row).

``split_query_gate`` turns a fused weight (or bias) into (queries, gates); ``fuse_query_gate`` is its
exact inverse. ``load_fused_query`` reads fused weights into a model converted with ``convert(...,
"gated")``. Rows of a ``nn.Linear`` weight are output features, so all moves are row permutations.

Shapes: H query heads, K = H_kv key/value heads, G = H / K, d head dim, g gate width per head (d or 1), D input width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sinkless.errors import SinklessError

__all__ = ["LAYOUTS", "split_query_gate", "fuse_query_gate", "load_fused_query", "export_fused_query"]

LAYOUTS = ("reference", "qwen3_next")


def _check(layout: str, heads: int, kv_heads: int, headwise: bool) -> None:
    if layout not in LAYOUTS:
        raise SinklessError(f"unknown gate layout {layout!r}", fix=f"choose one of {', '.join(LAYOUTS)}")
    if heads % kv_heads:
        raise SinklessError(f"{heads} query heads cannot be grouped over {kv_heads} key/value heads",
                            fix="the config's num_attention_heads must be a multiple of num_key_value_heads")


def split_query_gate(
    fused: torch.Tensor, *, heads: int, kv_heads: int, head_dim: int, layout: str, headwise: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused (H·d + H·g, …) weight or bias -> (queries (H·d, …), gates (H·g, …)), both head-major."""
    _check(layout, heads, kv_heads, headwise)
    g = 1 if headwise else head_dim
    rest = fused.shape[1:]
    if fused.shape[0] != heads * (head_dim + g):
        raise SinklessError(
            f"a fused query+gate projection of {heads} heads x {head_dim} dims ({'headwise' if headwise else 'elementwise'}) "
            f"has {heads * (head_dim + g)} rows, this one has {fused.shape[0]}",
            fix="check heads, head_dim and headwise against the checkpoint's config",
        )
    if layout == "qwen3_next":
        per_head = fused.reshape(heads, head_dim + g, *rest)  # (H, d + g, …)
        queries, gates = per_head[:, :head_dim], per_head[:, head_dim:]
    else:
        group = heads // kv_heads
        per_group = fused.reshape(kv_heads, group * (head_dim + g), *rest)  # (K, G·d + G·g, …)
        queries, gates = per_group[:, : group * head_dim], per_group[:, group * head_dim :]
    return queries.reshape(heads * head_dim, *rest), gates.reshape(heads * g, *rest)


def fuse_query_gate(
    queries: torch.Tensor, gates: torch.Tensor, *, heads: int, kv_heads: int, head_dim: int, layout: str, headwise: bool = False
) -> torch.Tensor:
    """The inverse of ``split_query_gate``: (H·d, …) queries and (H·g, …) gates -> the fused rows of ``layout``."""
    _check(layout, heads, kv_heads, headwise)
    g = 1 if headwise else head_dim
    rest = queries.shape[1:]
    if layout == "qwen3_next":
        fused = torch.cat([queries.reshape(heads, head_dim, *rest), gates.reshape(heads, g, *rest)], dim=1)  # (H, d + g, …)
    else:
        group = heads // kv_heads
        fused = torch.cat(
            [queries.reshape(kv_heads, group * head_dim, *rest), gates.reshape(kv_heads, group * g, *rest)], dim=1
        )  # (K, G·d + G·g, …)
    return fused.reshape(heads * (head_dim + g), *rest)


def _modules(model: nn.Module):
    from sinkless.attention.convert import _heads, attention_modules, converted_spec

    spec = converted_spec(model)
    if spec is None or spec.variant != "gated":
        raise SinklessError("the model is not converted to gated attention", fix="call convert(model, 'gated', init='none') first")
    for path, module in attention_modules(model):
        heads, head_dim = _heads(module)
        kv_heads = module.k_proj.out_features // head_dim
        yield path, module, dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, headwise=spec.gate == "headwise")


@torch.no_grad()
def load_fused_query(model: nn.Module, state: Mapping[str, torch.Tensor], layout: str) -> None:
    """Copy fused ``<attention>.q_proj.weight`` (and bias) rows of ``state`` into q_proj and gate_proj.

    ``state`` uses the model's own module paths (e.g. ``model.layers.0.self_attn.q_proj.weight``).
    A gate bias (present when the checkpoint's ``qkv_bias`` is on) has no place in ``gate_proj`` and is an error.
    """
    for path, module, shape in _modules(model):
        weight = state.get(f"{path}.q_proj.weight")
        if weight is None:
            raise SinklessError(f"the checkpoint has no {path}.q_proj.weight", fix="pass the state dict of a gated checkpoint")
        queries, gates = split_query_gate(weight, layout=layout, **shape)
        module.q_proj.weight.copy_(queries)
        module.gate_proj.weight.copy_(gates)
        bias = state.get(f"{path}.q_proj.bias")
        if bias is not None:
            q_bias, g_bias = split_query_gate(bias, layout=layout, **shape)
            if module.q_proj.bias is None or g_bias.abs().max() > 0:
                raise SinklessError(f"{path}: the checkpoint's fused q_proj has a bias this model cannot hold")
            module.q_proj.bias.copy_(q_bias)


@torch.no_grad()
def export_fused_query(model: nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """The fused ``q_proj`` weights (and biases) of a gated model in ``layout``: the inverse of ``load_fused_query``."""
    out = {}
    for path, module, shape in _modules(model):
        out[f"{path}.q_proj.weight"] = fuse_query_gate(module.q_proj.weight, module.gate_proj.weight, layout=layout, **shape)
        if module.q_proj.bias is not None:
            zeros = torch.zeros(module.gate_proj.out_features, dtype=module.q_proj.bias.dtype)
            out[f"{path}.q_proj.bias"] = fuse_query_gate(module.q_proj.bias, zeros, layout=layout, **shape)
    return out
