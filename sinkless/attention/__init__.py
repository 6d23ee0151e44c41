"""Attention that needs no sink: variant functions, conversion of HF models, training and comparison.

See ``functions`` (the mathematics), ``convert`` (swapping a Hugging Face model's attention),
``layouts`` (published gate weight layouts), ``metrics`` (sink metrics of any variant), ``train``
(``sinkless train-attn``) and ``compare`` (``sinkless compare-attn``).
"""

from sinkless.attention.convert import (
    CONVERTIBLE,
    VARIANTS,
    AttentionSpec,
    Conversion,
    attention_probabilities,
    convert,
    converted_spec,
    load,
    register_functions,
)
from sinkless.attention.functions import (
    elu1_attention,
    gated_attention,
    sigmoid_attention,
    sink_logit_attention,
    softmax_attention,
)
from sinkless.attention.layouts import LAYOUTS, export_fused_query, fuse_query_gate, load_fused_query, split_query_gate

__all__ = [
    "softmax_attention",
    "sigmoid_attention",
    "elu1_attention",
    "sink_logit_attention",
    "gated_attention",
    "VARIANTS",
    "CONVERTIBLE",
    "LAYOUTS",
    "AttentionSpec",
    "Conversion",
    "convert",
    "converted_spec",
    "attention_probabilities",
    "load",
    "register_functions",
    "split_query_gate",
    "fuse_query_gate",
    "load_fused_query",
    "export_fused_query",
]
