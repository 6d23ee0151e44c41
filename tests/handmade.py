"""Hand-made activations for tests of the diagnosis: exact token norms, attention and MLP activations
planted into a tiny random model through the hook primitive, so verdicts have answers known by
construction (the model's own numbers never decide them).

A ``Plant`` replaces, at the layers it names, the block output (every token a vector with the given
norm on channel 0), the attention probabilities and/or the MLP hidden activations. It is an
intervention for ``scan(..., intervention=plant)`` (optionally declaring a token layout, as
test-time registers do), or a plain context manager ``with plant(): ...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from conftest import tiny_model
from sinkless import zoo
from sinkless.adapters import adapter_for
from sinkless.hooks import hooks
from sinkless.images import ImageSpec

Values = torch.Tensor | Callable[[int], torch.Tensor]
"""Per-token values (N,) or (B, N), or a function of the sequence length N giving them."""


def _values(spec: Values, n: int) -> torch.Tensor:
    return spec(n) if callable(spec) else spec


def tiny_vit(size: int = 56) -> zoo.Loaded:
    """Tiny random DINOv2 (3 layers, width 32, MLP width 64, patch 14): a (size/14)^2 patch grid + CLS."""
    model = tiny_model("dinov2")
    return zoo.Loaded("hand-vit", model, adapter_for(model), ImageSpec(size=size, patch_size=14))


def tiny_lm() -> zoo.Loaded:
    """Tiny random Llama (3 layers) with a word-level tokenizer: ``"w1 w2 w3"`` is the ids 1, 2, 3."""
    from tests.test_zoo import _tiny_tokenizer

    model = tiny_model("llama")
    return zoo.Loaded("hand-lm", model, adapter_for(model), tokenizer=_tiny_tokenizer())


def words(n: int) -> str:
    """A text of ``n`` tokens for ``tiny_lm``."""
    return " ".join(f"w{i % 60 + 1}" for i in range(n))


class Plant:
    """Replace block outputs (``norms``), attention probabilities (``attention``: a function of the
    captured (B, H, N, N) tensor) and MLP hidden activations (``hidden``: a function of (N, W)) at the
    given layers. ``layout``: the token layout the scan should use (an intervention that says where
    its tokens are)."""

    def __init__(
        self,
        loaded: zoo.Loaded,
        norms: dict[int, Values] | None = None,
        attention: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        hidden: dict[int, Callable[[int, int], torch.Tensor]] | None = None,
        layout=None,
    ) -> None:
        self.loaded = loaded
        self.norms, self.attention, self.hidden = norms or {}, attention or {}, hidden or {}
        if layout is not None:
            self.layout = layout

    def edits(self) -> dict:
        adapter = self.loaded.adapter
        edits = {}
        for layer, spec in self.norms.items():
            edits[adapter.residual_site(layer)] = self._residual(spec)
        for layer, fn in self.attention.items():
            edits[adapter.attention_site(layer)] = fn
        for layer, fn in self.hidden.items():
            edits[adapter.mlp_hidden_site(layer)] = self._hidden(fn)
        return edits

    @staticmethod
    def _residual(spec: Values):
        def edit(x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
            out = torch.zeros_like(x)
            out[..., 0] = _values(spec, x.shape[1]).to(x)  # a vector whose norm is exactly the value
            return out

        return edit

    @staticmethod
    def _hidden(fn):
        def edit(h: torch.Tensor) -> torch.Tensor:  # (B, N, W)
            return fn(h.shape[1], h.shape[2]).to(h).expand_as(h).clone()

        return edit

    @contextlib.contextmanager
    def __call__(self):
        with hooks(self.loaded.model, edit=self.edits()):
            yield self
