"""Test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers").

A few MLP neurons ("register neurons") write the high-norm artifacts into the tokens they pick.
Discovery ranks every (layer, neuron) by its mean |activation| on the outlier tokens. At inference
an extra token is added where every token can see it (appended after the patches for ViTs,
prepended for causal LMs); in each layer holding register neurons, the register receives the
neurons' maximum activation and the other tokens get zero, so the artifact moves into the register.

Differences from the official code: every element of a batch is edited (not only the first),
patch tokens are selected through the adapter's layout (the official DINOv2 slicing is off by one),
and both the paper's per-neuron max and the code's per-layer max are offered.

Shapes: B batch, N tokens (with registers), W MLP width, K register neurons of a layer.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sinkless._io import atomic_write_json
from sinkless._version import __version__
from sinkless.adapters import Modality, TokenLayout
from sinkless.errors import SinklessError
from sinkless.hooks import Hooks
from sinkless.zoo import Loaded

__all__ = ["MaxMode", "RegisterNeurons", "TestTimeRegisters", "load_neurons"]

log = logging.getLogger(__name__)


class MaxMode(str, enum.Enum):
    NEURON = "neuron"  # paper: each neuron's own max goes into the register
    LAYER = "layer"  # official code: one max per layer, over all of its register neurons


@dataclass
class RegisterNeurons:
    """The register neurons of a model and how they were found (the JSON file ``sinkless fix`` writes)."""

    model: str
    neurons: list[dict]  # [{"layer", "neuron", "score"}], best first
    detection_layer: int | None = None
    highest_layer: int | None = None
    threshold: float | None = None  # absolute norm threshold, when one was given
    rule: dict = field(default_factory=dict)
    top_k: int = 0
    sweep: list[dict] = field(default_factory=list)
    heldout: dict = field(default_factory=dict)  # before/after outlier counts on held-out inputs
    settings: dict = field(default_factory=dict)
    sinkless_version: str = __version__

    def by_layer(self) -> dict[int, list[int]]:
        layers: dict[int, list[int]] = {}
        for entry in self.neurons[: self.top_k or len(self.neurons)]:
            layers.setdefault(int(entry["layer"]), []).append(int(entry["neuron"]))
        return {layer: sorted(ids) for layer, ids in sorted(layers.items())}

    def with_top_k(self, k: int) -> RegisterNeurons:
        return RegisterNeurons(**{**asdict(self), "top_k": min(k, len(self.neurons))})

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def from_dict(cls, data: dict, source: str = "the file") -> RegisterNeurons:
        if not isinstance(data, dict) or "neurons" not in data or "model" not in data:
            raise SinklessError(f"{source} is not a register-neurons file (no 'model'/'neurons')", fix="pass a file written by `sinkless fix --out`")
        try:
            neurons = [{"layer": int(n["layer"]), "neuron": int(n["neuron"]), "score": float(n.get("score", 0.0))} for n in data["neurons"]]
        except (TypeError, KeyError, ValueError):
            raise SinklessError(f"{source}: every neuron needs integer 'layer' and 'neuron'", fix="pass a file written by `sinkless fix --out`") from None
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["neurons"] = neurons
        kwargs.setdefault("top_k", len(neurons))
        return cls(**kwargs)


def load_neurons(path: str | Path) -> RegisterNeurons:
    """Read a register-neurons JSON file, with clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.exists():
        raise SinklessError(f"register-neurons file not found: {path}", fix="create it with `sinkless fix --model NAME --out FILE`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SinklessError(f"{path} is not valid JSON ({error})", fix="pass a file written by `sinkless fix --out`") from None
    return RegisterNeurons.from_dict(data, str(path))


class TestTimeRegisters:
    """The intervention: ``with TestTimeRegisters(loaded, neurons)(): model(x)``, or ``.attach()`` -> handle.

    Vision: ``n_registers`` zero tokens are appended after the patches (after position embeddings, with
    none of their own); outputs are ``[CLS, trained registers, patches, test-time registers]`` and
    ``split()`` names the groups. Causal LMs: the register is prepended (every later token sees it)
    and the logits of the real tokens are returned aligned with the input, the register's dropped.
    With no neurons there is nothing to move: no token is added and the model is left exactly as it is.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        loaded: Loaded,
        neurons: RegisterNeurons | Sequence[tuple[int, int]],
        *,
        n_registers: int = 1,
        mode: MaxMode | str = MaxMode.NEURON,
        keep_first: bool = True,
    ) -> None:
        if n_registers < 1:
            raise ValueError(f"n_registers must be >= 1, got {n_registers}")
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.n = n_registers
        self.mode = MaxMode(mode)
        self.keep_first = keep_first  # text: leave the first real token (the model's own sink) untouched
        if isinstance(neurons, RegisterNeurons):
            self.layers = neurons.by_layer()
        else:
            self.layers = {}
            for layer, neuron in neurons:
                self.layers.setdefault(int(layer), []).append(int(neuron))
        if not self.layers:
            self.n = 0  # nothing to move: add no token, edit nothing
        n_layers = self.adapter.num_layers(loaded.model)
        bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if bad:
            raise SinklessError(f"register neurons name layers {bad} but {loaded.name} has {n_layers}", fix="use the neurons file made for this model")
        width = self.adapter.mlp_width(loaded.model)
        if any(not 0 <= n < width for ids in self.layers.values() for n in ids):
            raise SinklessError(f"register neurons outside 0..{width - 1}", fix="use the neurons file made for this model")
        self.text = loaded.modality is Modality.TEXT
        if self.text and not self.adapter.causal:
            raise SinklessError(f"test-time registers for {self.adapter.family} are not supported", fix="use a causal LM (Llama, Qwen3) or a vision model")
        if self.text and not self.adapter.rotary:
            raise SinklessError(
                f"test-time registers need a model whose positions follow the sequence length; {self.adapter.family} adds absolute position embeddings",
                fix="use a rotary causal LM (Llama, Qwen3)",
            )

    # -- token groups ----------------------------------------------------------------------------
    def layout(self, n_tokens: int, image_hw: tuple[int, int] | None = None) -> TokenLayout:
        """Layout of a sequence of ``n_tokens`` (registers included) while the intervention is on."""
        if self.text:
            return TokenLayout(n_tokens, 0, self.n)
        return self.adapter.layout(self.loaded.model, n_tokens, image_hw)

    def split(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vision outputs (B, N, D) -> {"cls", "registers" (trained), "patches", "test_time_registers"}."""
        groups = self.layout(hidden.shape[1]).split(hidden)
        return {"cls": groups["cls"], "registers": groups["registers"], "patches": groups["body"], "test_time_registers": groups["appended"]}

    def _register_slice(self, n_total: int) -> slice:
        return slice(0, self.n) if self.text else slice(n_total - self.n, n_total)

    def _edited_tokens(self, n_total: int) -> slice:
        """Tokens whose register-neuron activations are zeroed (patches; real text tokens)."""
        if self.text:
            return slice(self.n + (1 if self.keep_first else 0), n_total)
        prefix = self.adapter.n_cls + self.adapter.n_registers(self.loaded.model)
        return slice(prefix, n_total - self.n)

    # -- edits -----------------------------------------------------------------------------------
    def _add_tokens(self, x: torch.Tensor) -> torch.Tensor:
        zeros = x.new_zeros(x.shape[0], self.n, x.shape[2])  # (B, n, D): no position embedding
        return torch.cat([zeros, x], 1) if self.text else torch.cat([x, zeros], 1)

    def _move(self, neurons: list[int]):
        index = torch.tensor(neurons)

        def edit(hidden: torch.Tensor) -> torch.Tensor:  # (B, N, W)
            n_total = hidden.shape[1]
            registers = self._register_slice(n_total)
            real = torch.ones(n_total, dtype=torch.bool, device=hidden.device)
            real[registers] = False
            values = hidden[:, real][..., index]  # (B, N_real, K)
            peak = values.max(dim=1).values  # (B, K): every image of the batch gets its own
            if self.mode is MaxMode.LAYER:
                peak = peak.max(dim=-1, keepdim=True).values.expand_as(peak)
            hidden = hidden.clone()
            hidden[:, registers, index] = peak[:, None, :].expand(-1, self.n, -1).to(hidden.dtype)
            zeroed = self._edited_tokens(n_total)
            block = hidden[:, zeroed]
            block[..., index] = 0
            hidden[:, zeroed] = block
            return hidden

        return edit

    def _edits(self) -> dict:
        adapter = self.adapter
        edits: dict = {}
        if not self.layers:
            return edits
        if self.text:
            embed = _embedding_path(self.loaded)
            edits[f"{embed}:output"] = self._add_tokens
            edits[":input[attention_mask]"] = lambda mask: torch.cat([mask.new_ones(mask.shape[0], self.n), mask], 1)
            edits[":output"] = self._drop_register_logits
        else:
            edits[adapter.block_input_site(0)] = self._add_tokens
        for layer, neurons in self.layers.items():
            edits[adapter.mlp_hidden_site(layer)] = self._move(neurons)
        return edits

    def _drop_register_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.n :]

    def attach(self) -> Hooks:
        """Apply persistently; the returned handle's ``.remove()`` restores the model."""
        return Hooks(self.loaded.model, edit=self._edits())

    @contextlib.contextmanager
    def __call__(self) -> Iterator[TestTimeRegisters]:
        with self.attach():
            yield self


def _embedding_path(loaded: Loaded) -> str:
    embeddings = loaded.model.get_input_embeddings()
    for name, module in loaded.model.named_modules():
        if module is embeddings:
            return name
    raise SinklessError(f"cannot find the token embedding of {type(loaded.model).__name__}")
