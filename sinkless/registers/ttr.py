"""Test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers").

A few MLP neurons ("register neurons") write the high-norm artifacts into the tokens they pick.
Discovery ranks every (layer, neuron) by its mean |activation| on the outlier tokens. At inference
an extra token is added where every token can see it (appended after the patches for ViTs,
prepended for causal LMs); in each layer holding register neurons, the register receives the
neurons' maximum activation and the other tokens get zero, so the artifact moves into the register.

For causal LMs the register goes right after the first token, so every later token sees it while
the first token keeps position 0 and stays the model's own attention sink (putting the register
before it instead costs SmolLM2 +12 % perplexity against +1 %, see docs/RESULTS.md). Giving the
register the maximum over the sequence would leak later tokens into earlier predictions; it
receives instead each neuron's typical peak (the mean over the discovery inputs of the per-input
extreme), which keeps the model causal and works with KV caches: the register is inserted only
when the cache is empty.

Differences from the official code: every element of a batch is edited (not only the first),
patch tokens are selected through the adapter's layout (the official DINOv2 slicing is off by one),
and both the paper's per-neuron max and the code's per-layer max are offered. "Max" is the signed
value of largest magnitude: the maximum for neurons that fire positive (GELU ViTs), and the firing
value for the gated MLPs of LLMs, whose register neurons can fire negative.

Shapes: B batch, N tokens (with registers), W MLP width, K register neurons of a layer.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sinkless._io import atomic_write_json
from sinkless._transformers import CACHE_NAMES
from sinkless._version import __version__
from sinkless.adapters import Modality, TokenLayout
from sinkless.errors import SinklessError
from sinkless.hooks import Hooks
from sinkless.zoo import Loaded

__all__ = ["MaxMode", "RegisterNeurons", "TestTimeRegisters", "ZeroNeurons", "load_neurons"]

log = logging.getLogger(__name__)


class MaxMode(str, enum.Enum):
    NEURON = "neuron"  # paper: each neuron's own max goes into the register
    LAYER = "layer"  # official code: one max per layer, over all of its register neurons


@dataclass
class RegisterNeurons:
    """The register neurons of a model and how they were found (the JSON file ``sinkless fix`` writes)."""

    model: str
    neurons: list[dict]  # [{"layer", "neuron", "score", "peak"}], best first; peak: mean per-input max activation
    detection_layer: int | None = None
    highest_layer: int | None = None
    threshold: float | None = None  # absolute norm threshold, when one was given
    rule: dict = field(default_factory=dict)
    top_k: int = 0
    sweep: list[dict] = field(default_factory=list)
    heldout: dict = field(default_factory=dict)  # before/after outlier counts on held-out inputs
    settings: dict = field(default_factory=dict)
    sinkless_version: str = __version__

    def peaks(self) -> dict[tuple[int, int], float]:
        """Typical peak activation of each chosen neuron (used for the causal-LM register)."""
        return {(int(e["layer"]), int(e["neuron"])): float(e["peak"]) for e in self.neurons[: self.top_k] if e.get("peak") is not None}

    def by_layer(self) -> dict[int, list[int]]:
        layers: dict[int, list[int]] = {}
        for entry in self.neurons[: self.top_k or len(self.neurons)]:
            layers.setdefault(int(entry["layer"]), []).append(int(entry["neuron"]))
        return {layer: sorted(ids) for layer, ids in sorted(layers.items())}

    def with_top_k(self, k: int) -> RegisterNeurons:
        return RegisterNeurons(**{**asdict(self), "top_k": min(k, len(self.neurons))})

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, asdict(self))

    def check_model(self, name: str) -> bool:
        """Warn when these neurons were found on another model than ``name`` (indices then mean nothing); True if they match."""
        if self.model == name:
            return True
        log.warning(
            "these register neurons were made for %s, not %s: on another model their indices pick arbitrary neurons "
            "(make a file for it with `sinkless fix --model %s --out FILE`)", self.model, name, name,
        )
        return False

    @classmethod
    def from_dict(cls, data: dict, source: str = "the file") -> RegisterNeurons:
        """A neurons file's contents, every field checked: a ``SinklessError`` names the first bad one."""
        fix = "pass a file written by `sinkless fix --out` (or fix the field by hand)"
        if not isinstance(data, dict) or "neurons" not in data or "model" not in data:
            raise SinklessError(f"{source} is not a register-neurons file (no 'model'/'neurons')", fix="pass a file written by `sinkless fix --out`")
        if not isinstance(data["model"], str) or not data["model"]:
            raise SinklessError(f"{source}: 'model' must be the model's name, got {data['model']!r}", fix=fix)
        if not isinstance(data["neurons"], list):
            raise SinklessError(f"{source}: 'neurons' must be a list of {{\"layer\", \"neuron\"}} entries, got {type(data['neurons']).__name__}", fix=fix)
        neurons, seen = [], set()
        for i, entry in enumerate(data["neurons"]):
            where = f"{source}: neurons[{i}]"
            if not isinstance(entry, dict) or "layer" not in entry or "neuron" not in entry:
                raise SinklessError(f"{where} needs integer 'layer' and 'neuron', got {entry!r}", fix=fix)
            layer, neuron = _index(entry["layer"], f"{where}.layer", fix), _index(entry["neuron"], f"{where}.neuron", fix)
            if (layer, neuron) in seen:
                raise SinklessError(f"{where}: layer {layer} neuron {neuron} is listed twice", fix="list each neuron once")
            seen.add((layer, neuron))
            score = _number(entry.get("score", 0.0), f"{where}.score", fix, default=0.0)
            peak = _number(entry.get("peak"), f"{where}.peak", fix, default=None)
            neurons.append({"layer": layer, "neuron": neuron, "score": score, "peak": peak})
        top_k = data.get("top_k", len(neurons))
        if top_k is None:
            top_k = len(neurons)
        if not _whole(top_k) or not (1 if neurons else 0) <= top_k <= len(neurons):
            raise SinklessError(
                f"{source}: top_k must be a whole number from {1 if neurons else 0} to {len(neurons)} (the neurons listed), got {top_k!r}",
                fix=f"set top_k to how many of the listed neurons to use (1..{len(neurons)})" if neurons else fix,
            )
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("detection_layer", "highest_layer"):
            if kwargs.get(key) is not None:
                kwargs[key] = _index(kwargs[key], f"{source}: {key}", fix)
        if kwargs.get("threshold") is not None:
            kwargs["threshold"] = _number(kwargs["threshold"], f"{source}: threshold", fix, default=None)
            if kwargs["threshold"] is not None and kwargs["threshold"] <= 0:
                raise SinklessError(f"{source}: threshold must be positive, got {kwargs['threshold']}", fix=fix)
        for key, kind in (("rule", dict), ("sweep", list), ("heldout", dict), ("settings", dict)):
            if key in kwargs and not isinstance(kwargs[key], kind):
                raise SinklessError(f"{source}: {key!r} must be a {'JSON object' if kind is dict else 'list'}, got {type(kwargs[key]).__name__}", fix=fix)
        kwargs["neurons"] = neurons
        kwargs["top_k"] = int(top_k)
        return cls(**kwargs)


def _whole(value) -> bool:
    """An integer, or a float with an integer value (JSON writers differ); never a bool."""
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))


def _index(value, where: str, fix: str) -> int:
    if not _whole(value) or value < 0:
        raise SinklessError(f"{where} must be at least 0 (a whole number), got {value!r}", fix=fix)
    return int(value)


def _number(value, where: str, fix: str, *, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SinklessError(f"{where} must be a finite number, got {value!r}", fix=fix)
    return float(value)


def load_neurons(path: str | Path) -> RegisterNeurons:
    """Read a register-neurons JSON file, with clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.exists():
        raise SinklessError(f"register-neurons file not found: {path}", fix="create it with `sinkless fix --model NAME --out FILE`")
    if path.is_dir():
        raise SinklessError(f"{path} is a folder, not a register-neurons file", fix="pass the JSON file written by `sinkless fix --out`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SinklessError(f"{path} is not valid JSON ({error})", fix="pass a file written by `sinkless fix --out`") from None
    except OSError as error:
        raise SinklessError(f"cannot read {path} ({error.strerror or error})", fix="check its permissions") from None
    return RegisterNeurons.from_dict(data, str(path))


def _check_neurons(loaded: Loaded, layers: dict[int, list[int]]) -> None:
    """Every (layer, neuron) must exist in ``loaded``: a clear error otherwise (a file made for another model)."""
    n_layers = loaded.adapter.num_layers(loaded.model)
    bad = sorted(layer for layer in layers if not 0 <= layer < n_layers)
    if bad:
        raise SinklessError(f"register neurons name layers {bad} but {loaded.name} has {n_layers} (0..{n_layers - 1})", fix="use the neurons file made for this model")
    width = loaded.adapter.mlp_width(loaded.model)
    outside = sorted({n for ids in layers.values() for n in ids if not 0 <= n < width})
    if outside:
        raise SinklessError(f"register neurons {outside[:5]} are outside 0..{width - 1}, the MLP width of {loaded.name}", fix="use the neurons file made for this model")


def _by_layer(neurons: RegisterNeurons | Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """{layer: [neuron, ...]} of a neurons file's chosen top_k, or of (layer, neuron) pairs as given."""
    if isinstance(neurons, RegisterNeurons):
        return neurons.by_layer()
    layers: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        layers.setdefault(int(layer), []).append(int(neuron))
    return layers


class TestTimeRegisters:
    """The intervention on a model (a HF model object or a zoo ``Loaded``): ``with TestTimeRegisters(model, neurons):
    model(x)`` (or ``with ttr(): ...``); persistent: ``handle = ttr.attach()`` ... ``handle.remove()`` (or ``ttr.remove()``).

    Vision: ``n_registers`` zero tokens are appended after the patches (after position embeddings, with
    none of their own); outputs are ``[CLS, trained registers, patches, test-time registers]`` and
    ``split()`` names the groups. Causal LMs: the register is inserted after the first token
    (``after_first=False``: before it), every later token sees it, and the logits of the real tokens
    are returned aligned with the input, the register's dropped.
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
        only_firing: float | None = None,
        after_first: bool = True,
    ) -> None:
        if n_registers < 1:
            raise ValueError(f"n_registers must be >= 1, got {n_registers}")
        if not isinstance(loaded, Loaded):  # a model object the user holds: nothing is changed until attached
            from sinkless.pretrained import as_loaded

            loaded = as_loaded(loaded, processor=False)
        self.loaded = loaded
        self._attached: list[Hooks] = []
        self.adapter = loaded.adapter
        self.n = n_registers
        self.mode = MaxMode(mode)
        self.keep_first = keep_first  # text: leave the first real token (the model's own sink) untouched
        # zero a neuron only where |a| >= only_firing x |its peak| (None: everywhere, as in the paper)
        self.only_firing = only_firing
        # text: insert the register after the first real token (which keeps position 0) instead of before it
        self._at = 1 if after_first else 0
        self.layers = _by_layer(neurons)
        self.peaks: dict[tuple[int, int], float] = neurons.peaks() if isinstance(neurons, RegisterNeurons) else {}
        if not self.layers:
            self.n = 0  # nothing to move: add no token, edit nothing
        if isinstance(neurons, RegisterNeurons):
            neurons.check_model(loaded.name)
        _check_neurons(loaded, self.layers)
        self.text = loaded.modality is Modality.TEXT
        self._in_call = self.n  # text: registers present in the current forward call (0 once cached)
        if self.text and self.layers and any((l, n) not in self.peaks for l, ids in self.layers.items() for n in ids):
            log.info("no stored peak activations: the register gets each forward call's own maximum")
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
        if self.text:  # after_first: the first real token plays the part of a CLS token
            return TokenLayout(n_tokens, self._at, self.n)
        return self.adapter.layout(self.loaded.model, n_tokens, image_hw)

    def split(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vision outputs (B, N, D) -> {"cls", "registers" (trained), "patches", "test_time_registers"}."""
        groups = self.layout(hidden.shape[1]).split(hidden)
        return {"cls": groups["cls"], "registers": groups["registers"], "patches": groups["body"], "test_time_registers": groups["appended"]}

    def _register_slice(self, n_total: int) -> slice:
        return slice(self._at, self._at + self._in_call) if self.text else slice(n_total - self.n, n_total)

    def _edited_tokens(self, n_total: int) -> slice:
        """Tokens whose register-neuron activations are zeroed (patches; real text tokens)."""
        if self.text:  # the first real token (the model's own sink) is left alone, like ViTs' CLS
            if not self._in_call:  # a later chunk: every token is an ordinary one
                return slice(0, n_total)
            first = 1 if self.keep_first and self._at == 0 else 0
            return slice(self._at + self._in_call + first, n_total)
        prefix = self.adapter.n_cls + self.adapter.n_registers(self.loaded.model)
        return slice(prefix, n_total - self.n)

    # -- edits -----------------------------------------------------------------------------------
    def _add_tokens(self, x: torch.Tensor) -> torch.Tensor:
        n = self._in_call if self.text else self.n
        zeros = x.new_zeros(x.shape[0], n, x.shape[2])  # (B, n, D): no position embedding
        if self.text:
            return torch.cat([x[:, : self._at], zeros, x[:, self._at :]], 1)
        return torch.cat([x, zeros], 1)

    def _move(self, layer: int, neurons: list[int]):
        index = torch.tensor(neurons)
        stored = [self.peaks.get((layer, n)) for n in neurons]
        fixed = torch.tensor(stored) if self.text and all(v is not None for v in stored) else None

        def edit(hidden: torch.Tensor) -> torch.Tensor:  # (B, N, W)
            n_total = hidden.shape[1]
            registers = self._register_slice(n_total)
            n_reg = registers.stop - registers.start
            hidden = hidden.clone()
            if n_reg:
                real = torch.ones(n_total, dtype=torch.bool, device=hidden.device)
                real[registers] = False
                if fixed is not None:
                    peak = fixed.to(hidden).expand(hidden.shape[0], -1)  # (B, K): causal, no look-ahead
                else:
                    peak = _extreme(hidden[:, real][..., index], dim=1)  # (B, K): every image its own
                if self.mode is MaxMode.LAYER:
                    peak = _extreme(peak, dim=-1)[:, None].expand_as(peak)
                hidden[:, registers, index] = peak[:, None, :].expand(-1, n_reg, -1).to(hidden.dtype)
            zeroed = self._edited_tokens(n_total)
            block = hidden[:, zeroed]
            if self.only_firing is None:
                block[..., index] = 0
            else:
                values = block[..., index]  # (B, N', K)
                limit = self.only_firing * (fixed.to(values).abs() if fixed is not None else values.abs().amax(1, keepdim=True))
                block[..., index] = values.masked_fill(values.abs() >= limit, 0.0)
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
            # order matters: a call starts with registers, unless its KV cache already holds them
            edits[":input"] = self._start_call
            for name in CACHE_NAMES:  # past_key_values, or cache from transformers 5.25 on (only the one passed fires)
                edits[f":input[{name}]"] = self._check_cache
            edits[":input[position_ids]"] = self._refuse_positions
            edits[f"{embed}:output"] = self._add_tokens
            edits[":input[attention_mask]"] = self._extend_mask
            edits[":output"] = self._drop_register_logits
        else:
            edits[adapter.block_input_site(0)] = self._add_tokens
            encoder = adapter.blocks.rpartition(".")[0]  # a padding mask (SigLIP2) grows with the registers
            edits[f"{encoder}:input[attention_mask]"] = self._extend_vision_mask
            head = _mask_reading_head(self.loaded.model, encoder)
            if head is not None:  # SigLIP2's pooling head reads that padding mask too (positionally): it sees the registers
                edits[f"{head}:input[*]"] = self._extend_head_mask
        for layer, neurons in self.layers.items():
            edits[adapter.mlp_hidden_site(layer)] = self._move(layer, neurons)
        return edits

    def _start_call(self, first_input):
        self._in_call = self.n
        return first_input

    def _check_cache(self, cache):
        if hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            self._in_call = 0  # the register was prepended by an earlier call and sits in the cache
        return cache

    def _refuse_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self._in_call:  # positions for the tokens without the register: RoPE would get one position too few
            raise SinklessError(
                "test-time registers on a language model insert a token, and this call numbers the tokens itself "
                "(position_ids, as model.generate() passes them)",
                fix="score with plain forward calls (model(input_ids=...), chunks with a KV cache; `sinkless ppl --registers`), "
                    "and generate without the registers",
            )
        return position_ids

    def _extend_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self._in_call and self._at and bool((mask[:, : self._at] == 0).any()):
            raise SinklessError(
                "a left-padded batch: the register would go after a pad token, not after each row's first real token",
                fix="pad on the right (tokenizer.padding_side = 'right'), or run the rows one by one",
            )
        ones = mask.new_ones(mask.shape[0], self._in_call)
        return torch.cat([mask[:, : self._at], ones, mask[:, self._at :]], 1)

    def _extend_vision_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) or (B, 1, N, N) mask of the patches -> with the appended registers: every token sees them,
        and they see what the first token sees."""
        allowed = True if mask.dtype == torch.bool else 1 if mask.ndim == 2 else 0
        if mask.ndim == 2:
            return torch.cat([mask, mask.new_full((mask.shape[0], self.n), allowed)], 1)
        b, h, n, _ = mask.shape
        mask = torch.cat([mask, mask.new_full((b, h, n, self.n), allowed)], -1)  # (B, h, N, N + n)
        rows = mask[:, :, :1].expand(b, h, self.n, n + self.n)  # (B, h, n, N + n)
        return torch.cat([mask, rows], 2)

    def _extend_head_mask(self, inputs: dict) -> dict:
        mask = inputs.get("attention_mask")
        return inputs if mask is None else {**inputs, "attention_mask": self._extend_vision_mask(mask)}

    def _drop_register_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([logits[:, : self._at], logits[:, self._at + self._in_call :]], 1)

    def attach(self) -> Hooks:
        """Apply persistently; the returned handle's ``.remove()`` (or ``self.remove()``) restores the model."""
        handle = Hooks(self.loaded.model, edit=self._edits())
        self._attached.append(handle)
        return handle

    def remove(self) -> None:
        """Take off every attachment of this intervention (safe to call twice)."""
        while self._attached:
            self._attached.pop().remove()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[TestTimeRegisters]:
        handle = self.attach()
        try:
            yield self
        finally:
            handle.remove()
            if handle in self._attached:
                self._attached.remove(handle)

    def __enter__(self) -> TestTimeRegisters:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _extreme(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The signed value of largest magnitude along ``dim``: the max for neurons that fire positive
    (GELU ViTs), the firing value also for gated MLPs whose register neurons fire negative."""
    index = values.abs().argmax(dim=dim, keepdim=True)
    return values.gather(dim, index).squeeze(dim)


def _mask_reading_head(model: torch.nn.Module, encoder: str) -> str | None:
    """The path of a pooling head beside ``encoder`` that takes the patches' padding mask (SigLIP2), if there is one."""
    parent = encoder.rpartition(".")[0]
    name = f"{parent}.head" if parent else "head"
    try:
        head = model.get_submodule(name)
    except AttributeError:
        return None
    return name if "attention_mask" in inspect.signature(head.forward).parameters else None


def _embedding_path(loaded: Loaded) -> str:
    embeddings = loaded.model.get_input_embeddings()
    for name, module in loaded.model.named_modules():
        if module is embeddings:
            return name
    raise SinklessError(f"cannot find the token embedding of {type(loaded.model).__name__}",
                        fix="test-time registers on a language model need its input embedding (model.get_input_embeddings()); use a Hugging Face causal LM")


class ZeroNeurons:
    """The ablation the papers compare against: the same neurons set to zero on every token, no register.

    ``with ZeroNeurons(loaded, neurons)(): ...`` — Jiang et al. report it hurts (OpenCLIP zero-shot 71.3 -> 55.6).
    """

    def __init__(self, loaded: Loaded, neurons: RegisterNeurons | Sequence[tuple[int, int]]) -> None:
        self.loaded = loaded
        self.layers = _by_layer(neurons)
        if isinstance(neurons, RegisterNeurons):
            neurons.check_model(loaded.name)
        _check_neurons(loaded, self.layers)

    def _zero(self, neurons: list[int]):
        index = torch.tensor(neurons)

        def edit(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.clone()
            hidden[..., index] = 0
            return hidden

        return edit

    def attach(self) -> Hooks:
        adapter = self.loaded.adapter
        return Hooks(self.loaded.model, edit={adapter.mlp_hidden_site(l): self._zero(n) for l, n in self.layers.items()})

    @contextlib.contextmanager
    def __call__(self) -> Iterator[ZeroNeurons]:
        with self.attach():
            yield self
