"""Attention probabilities in query chunks: sink metrics of long inputs in bounded memory.

Eager attention materialises every layer's (heads x n x n) probability matrix; a 32k-token scan
would need 36 GB per layer of SmolLM2. The sink metrics (first-token share, Sink_eps alpha_0 of
Xiao et al. 2024 and Gu et al. 2025, attention mass on outlier tokens, the learned sink's share)
only read a few columns of it. ``chunked_attention`` is an attention implementation registered with
transformers' ``AttentionInterface``: each attention call runs the model family's *own* eager
function (``eager_attention_forward`` of its modeling file: GQA, soft-capping, gpt-oss sink logits
and all) on a chunk of queries at a time, hands each chunk's probabilities to a listener, and
concatenates the outputs, so the model computes what eager attention computes while at most one
chunk of probabilities exists. Its mask function returns a ``LazyMask``: the causal / sliding /
padding pattern, evaluated one chunk of rows at a time instead of an (n x n) tensor.

Nothing is global while no context is entered: the implementation is registered under its own
name and a model uses it only inside ``chunked_attention(model, listeners)``.

Shapes: B batch, H heads, n queries, K keys, c queries in a chunk, d head dim.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sinkless.adapters import attention_implementation

__all__ = ["IMPLEMENTATION", "chunked_attention", "supports_chunking", "LazyMask", "CHUNK_BYTES"]

IMPLEMENTATION = "sinkless_chunked"
CHUNK_BYTES = 64 * 2**20
"""Default size of one chunk of float32 probabilities (B x H x c x K): about 64 MB."""

Listener = Callable[[torch.Tensor, int], None]
"""Receives each chunk's probabilities (B, H, c, K) and the index of its first query."""

_LISTENERS: dict[int, Listener] = {}  # id(attention module) -> listener, only inside a context
_CHUNK: list[int] = [0]  # queries per chunk (0: sized from CHUNK_BYTES)


@dataclass
class LazyMask:
    """What transformers would turn into an (B, 1, n, K) mask, kept as the arguments of ``sdpa_mask``."""

    arguments: dict

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, stop - start, K) of queries ``start:stop``: 0 where allowed, the dtype's min elsewhere."""
        from transformers.masking_utils import sdpa_mask

        args = {**self.arguments, "q_length": stop - start, "q_offset": self.arguments.get("q_offset", 0) + start}
        args["allow_is_causal_skip"] = False
        allowed = sdpa_mask(**args)  # (B, 1, c, K) bool
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _lazy_mask(**kwargs) -> LazyMask:
    keep = {k: v for k, v in kwargs.items() if k not in ("dtype", "config")}
    return LazyMask(keep)


@functools.lru_cache(maxsize=64)
def _family_eager(module_type: type) -> Callable | None:
    """The eager attention function of the modeling file that defines ``module_type`` (None if it has none)."""
    module = sys.modules.get(module_type.__module__)
    if module is None or "ALL_ATTENTION_FUNCTIONS" not in vars(module):
        return None
    return getattr(module, "eager_attention_forward", None)


def supports_chunking(model: nn.Module, attention_modules: list[nn.Module]) -> bool:
    """Whether every attention module dispatches through transformers' AttentionInterface with an eager function."""
    return bool(attention_modules) and all(_family_eager(type(m)) is not None for m in attention_modules)


def _rows(mask, start: int, stop: int, kv_stop: int, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, LazyMask):
        rows = mask.rows(start, stop, dtype)
    else:  # a ready 4D tensor (bool: True = attend; float: additive)
        rows = mask[:, :, start:stop]
        if rows.dtype == torch.bool:
            rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device).masked_fill(~rows, torch.finfo(dtype).min)
    return rows[..., :kv_stop]


def _causal_rows(start: int, stop: int, n_queries: int, n_keys: int, kv_stop: int, dtype, device) -> torch.Tensor:
    """(1, 1, c, kv_stop) additive causal mask of queries ``start:stop`` when the model passed none."""
    offset = n_keys - n_queries  # keys before the first query (a cache)
    q = torch.arange(start, stop, device=device)[:, None] + offset
    k = torch.arange(kv_stop, device=device)[None, :]
    return torch.zeros(stop - start, kv_stop, dtype=dtype, device=device).masked_fill(k > q, torch.finfo(dtype).min)[None, None]


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """The registered implementation: the family's eager attention, one chunk of queries at a time."""
    eager = _family_eager(type(module))
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no eager attention function to chunk")
    batch, heads, n, _ = query.shape  # (B, H, n, d)
    n_keys = key.shape[-2]
    chunk = _CHUNK[0] or max(1, CHUNK_BYTES // (4 * batch * heads * n_keys))
    causal = getattr(module, "is_causal", False) is True
    listener = _LISTENERS.get(id(module))
    outputs = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # causal: the chunk's last query sees no key after it, so later keys are left out of the product
        kv_stop = min(n_keys, n_keys - n + stop) if causal else n_keys
        rows = _rows(attention_mask, start, stop, kv_stop, query.dtype)
        if rows is None and causal:
            rows = _causal_rows(start, stop, n, n_keys, kv_stop, query.dtype, query.device)
        out, probs = eager(module, query[:, :, start:stop], key[:, :, :kv_stop], value[:, :, :kv_stop], rows, **kwargs)
        if listener is not None:
            listener(probs, start)  # (B, H, c, kv_stop)
        outputs.append(out)  # (B, c, H, d)
    return torch.cat(outputs, dim=1), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, _attention)
        AttentionMaskInterface.register(IMPLEMENTATION, _lazy_mask)


@contextlib.contextmanager
def chunked_attention(model: nn.Module, listeners: Mapping[nn.Module, Listener], *, chunk: int = 0) -> Iterator[nn.Module]:
    """Run ``model`` with query-chunked eager attention; ``listeners[module]`` sees that module's probabilities.

    ``chunk``: queries per chunk (0: about ``CHUNK_BYTES`` (64 MB) of float32 probabilities per chunk).
    Restores the model's attention implementation and drops the listeners on exit, exception or not.
    """
    _register()
    previous = _CHUNK[0]
    _CHUNK[0] = chunk
    _LISTENERS.update({id(module): fn for module, fn in listeners.items()})
    try:
        with attention_implementation(model, IMPLEMENTATION):
            yield model
    finally:
        _CHUNK[0] = previous
        for module in listeners:
            _LISTENERS.pop(id(module), None)
