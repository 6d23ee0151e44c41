"""One forward pass per batch, with hooks on every block: per-input, per-layer measurements.

Everything is computed per input (thresholds included), so a scan gives the same numbers whatever
the batch size. Attention metrics follow Xiao et al. 2024 (first-token share), Gu et al. 2025
(Sink_eps) and Sun et al. 2024 (massive activations); norms and outliers follow Darcet et al. 2024.
Hooks reduce what they see on arrival (token norms, a few attention columns), and language models'
attention runs in query chunks (``scan.attention``), so memory stays bounded on long inputs. The
attention share on outliers of a layer is the mass its queries send to the outliers of *that
layer's input* (the block's input residual stream).

Shapes: B inputs, H heads, N tokens, D width, L scanned layers, P body tokens (patches / text tokens).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sinkless.adapters import Modality, TokenLayout, eager_attention, rope_scaled
from sinkless.hooks import hooks, stop_after
from sinkless.patches import as_tokens, neighbor_similarity
from sinkless.scan.attention import CHUNK_BYTES, chunked_attention, supports_chunking
from sinkless.scan.inputs import ImageInput, TextInput, prepare_batch
from sinkless.scan.norms import OutlierRule, thresholds
from sinkless.zoo import Loaded

__all__ = ["ScanSettings", "InputRecord", "measure_batch", "parse_layers", "model_inputs", "to_model"]


@dataclass(frozen=True)
class ScanSettings:
    rule: OutlierRule = OutlierRule()
    layers: tuple[int, ...] | None = None  # None: every layer
    batch_size: int = 8
    image_size: int | None = None  # vision: square side in pixels (default: the model's)
    max_tokens: int = 512  # text: truncate longer inputs
    warmup: int = 4  # text: first-token share counts queries from this position on
    epsilon: float = 0.3  # Sink_eps threshold (Gu et al. 2025)
    massive_abs: float = 100.0  # massive activation: |a| > massive_abs ...
    massive_rel: float = 1000.0  # ... and > massive_rel x the layer's median |a| (Sun et al. 2024)
    massive_per_layer: int = 20  # keep at most this many massive entries per input and layer
    attention: bool = True  # capture attention probabilities (eager attention); False: norms only
    attention_chunk: int | None = 0  # causal LMs: queries per attention chunk (0: chunks of ~64 MB when a layer's matrix is larger; None: never)
    rope_scale: float = 1.0  # rotary models: linear position interpolation, positions / rope_scale (longer inputs)

    def to_dict(self) -> dict:
        return {
            "rule": self.rule.to_dict(),
            "layers": list(self.layers) if self.layers is not None else "all",
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "max_tokens": self.max_tokens,
            "warmup": self.warmup,
            "epsilon": self.epsilon,
            "massive_abs": self.massive_abs,
            "massive_rel": self.massive_rel,
            "attention": self.attention,
            "attention_chunk": self.attention_chunk,
            "rope_scale": self.rope_scale,
        }


def parse_layers(spec: str | None, n_layers: int) -> tuple[int, ...] | None:
    """``"all"``, ``"3"``, ``"0-5,11"`` or ``"-1"`` (the last layer) -> sorted layer indices (None: all)."""
    from sinkless.errors import SinklessError

    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if match := re.fullmatch(r"(\d+)-(\d+)", part):
            lo, hi = int(match[1]), int(match[2])
        elif re.fullmatch(r"-?\d+", part):
            lo = hi = int(part) + (n_layers if int(part) < 0 else 0)
        else:
            raise SinklessError(f"bad --layers {spec!r}", fix="use 'all', '3', '0-5,11' or '-1' (the last layer)")
        if lo > hi:
            raise SinklessError(f"--layers {spec!r}: the range {part!r} runs backwards", fix=f"write it low to high: '{hi}-{lo}'")
        if not (0 <= lo <= hi < n_layers):
            raise SinklessError(f"--layers {spec!r} names layers outside 0..{n_layers - 1}", fix=f"the model has {n_layers} layers")
        chosen.update(range(lo, hi + 1))
    return tuple(sorted(chosen))


@dataclass
class InputRecord:
    """What one input showed at every scanned layer (CPU tensors)."""

    name: str
    layout: TokenLayout
    layers: list[int]
    body: torch.Tensor  # (N,) bool: the tokens outliers are looked for among (patches; text tokens after position 0)
    norms: torch.Tensor  # (L, N) residual-stream norm of every token
    thresholds: torch.Tensor  # (L,) outlier threshold on body tokens
    outliers: torch.Tensor  # (L, N) bool, body tokens only
    medians: torch.Tensor  # (L,) median body-token norm
    share_cls: torch.Tensor | None = None  # (L,) CLS attention on the layer's input outliers (vision)
    share_body: torch.Tensor | None = None  # (L,) mean non-outlier body query attention on them
    share_all: torch.Tensor | None = None  # (L,) mean over all non-outlier queries
    cls_attention: torch.Tensor | None = None  # (N,) last scanned layer, CLS row (mean over heads)
    first_token: torch.Tensor | None = None  # (L,) text: share of attention on token 0
    alpha0: torch.Tensor | None = None  # (L, H) text: mean attention on token 0 per head
    neighbor_similarity: torch.Tensor | None = None  # (P,) vision: input-embedding similarity to neighbours
    massive: list[dict] = field(default_factory=list)
    tokens: list[str] | None = None  # text: decoded tokens
    image_hw: tuple[int, int] | None = None
    learned_sink: torch.Tensor | None = None  # (L,) gpt-oss: mean attention share of the learned sink logit
    attention_gate: torch.Tensor | None = None  # (L,) gated attention: mean sigmoid output gate


def first_token(layout: TokenLayout) -> int:
    """Text: index of the first real token, the model's own sink (a CLS-like first token, else the body's first)."""
    return 0 if layout.n_cls else layout.body.start


def body_tokens(layout: TokenLayout, text: bool) -> torch.Tensor:
    """(N,) bool: where outliers are looked for; text leaves out its first real token (the sink itself)."""
    body = torch.zeros(layout.n_tokens, dtype=torch.bool)
    body[layout.body] = True
    if text:
        body[first_token(layout)] = False
    return body


def _outlier_masks(norms: torch.Tensor, body: torch.Tensor, rule: OutlierRule):
    """Thresholds, outlier masks and medians for one input's (L, N) norms over the ``body`` tokens."""
    mask = body.expand_as(norms)
    tau = thresholds(norms, rule, mask)  # (L,)
    medians = norms.masked_fill(~mask, float("nan")).nanmedian(-1).values
    return tau, (norms > tau[:, None]) & mask, medians


def _massive(residual: torch.Tensor, layer: int, settings: ScanSettings) -> list[dict]:
    """Entries with |a| > massive_abs and > massive_rel x the layer's median |a|: (N, D) one input."""
    magnitude = residual.abs()
    if magnitude.numel() == 0 or float(magnitude.max()) <= settings.massive_abs:  # nothing can pass the absolute floor: skip the median (exact)
        return []
    floor = max(settings.massive_abs, settings.massive_rel * float(magnitude.median()))
    hits = (magnitude > floor).nonzero()
    if len(hits) == 0:
        return []
    values = residual[hits[:, 0], hits[:, 1]]
    order = values.abs().argsort(descending=True)[: settings.massive_per_layer]
    return [{"layer": layer, "token": int(hits[i, 0]), "channel": int(hits[i, 1]), "value": float(values[i])} for i in order]


def model_inputs(loaded: Loaded, batch, settings: ScanSettings):
    """Model kwargs, per-input lengths, image size and decoded tokens for a batch (see ``inputs.prepare_batch``)."""
    prepared = prepare_batch(loaded, batch, image_size=settings.image_size, max_tokens=settings.max_tokens)
    return prepared.kwargs, prepared.lengths, prepared.image_hw, prepared.tokens


def to_model(kwargs: dict, model: torch.nn.Module) -> dict:
    """Inputs on the model's device; floating inputs (pixels) in its dtype."""
    param = next(model.parameters(), None)
    if param is None:
        return kwargs
    moved = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(param.device, dtype=param.dtype if value.is_floating_point() else None)
        moved[key] = value
    return moved


class _Collector:
    """Hook reducers that keep, per layer and input, only what the metrics need (norms, a few attention columns).

    Nothing of size n x n is stored: attention probabilities, whole or a chunk of queries at a time, are
    reduced on arrival to the per-head column of the first token (B, H, n), the mass each query sends
    to the layer's input outliers (B, n), the CLS row (vision) and the learned sink's share (B, n).
    """

    def __init__(self, loaded: Loaded, settings: ScanSettings, layouts: Callable[[int], list[TokenLayout]], n_layers: int) -> None:
        self.loaded, self.settings, self.layouts = loaded, settings, layouts
        self.vision = loaded.modality is Modality.VISION
        self.norms: dict[int, torch.Tensor] = {}  # layer -> (B, N)
        self.massive: dict[int, list[list[dict]]] = {}
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (B, N) bool: outliers of the block's input
        self.first_col: dict[int, torch.Tensor] = {}  # layer -> (B, H, N)
        self.mass: dict[int, torch.Tensor] = {}  # layer -> (B, N)
        self.sink: dict[int, torch.Tensor] = {}  # layer -> (B, N) learned sink share (gpt-oss)
        self.gate: dict[int, torch.Tensor] = {}  # layer -> (B,) mean output gate (gated attention)
        self.cls_row: torch.Tensor | None = None  # (B, N) last layer, CLS query, mean over heads
        self.last = n_layers - 1

    def _bodies(self, n: int) -> tuple[list[TokenLayout], torch.Tensor]:
        layouts = self.layouts(n)
        body = torch.zeros(len(layouts), n, dtype=torch.bool)
        for i, layout in enumerate(layouts):
            body[i, : layout.n_tokens] = body_tokens(layout, text=not self.vision)
        return layouts, body

    def residual(self, layer: int):
        def reduce(hidden: torch.Tensor):  # (B, N, D)
            layouts = self.layouts(hidden.shape[1])
            self.norms[layer] = hidden.float().norm(dim=-1).cpu()  # (B, N)
            self.massive[layer] = [_massive(hidden[i, : lay.n_tokens].float().cpu(), layer, self.settings) for i, lay in enumerate(layouts)]
            return None

        return reduce

    def block_input(self, layer: int):
        def reduce(hidden: torch.Tensor):  # (B, N, D)
            layouts, body = self._bodies(hidden.shape[1])
            norms = hidden.float().norm(dim=-1).cpu()  # (B, N)
            keys = torch.zeros_like(body)
            for i, layout in enumerate(layouts):
                n = layout.n_tokens
                _, flagged, _ = _outlier_masks(norms[i : i + 1, :n], body[i, :n], self.settings.rule)
                keys[i, :n] = flagged[0]
            self.keys[layer] = keys
            return None

        return reduce

    def attention(self, layer: int):
        def absorb(probs: torch.Tensor, start: int = 0):  # (B, H, c, K): queries start..start+c
            probs = probs.float()
            b, h, c, k = probs.shape
            n = self.keys[layer].shape[1]
            if layer not in self.mass:
                self.mass[layer] = torch.zeros(b, n)
                if not self.vision:
                    self.first_col[layer] = torch.zeros(b, h, n)
                if self.loaded.adapter.sinks:
                    self.sink[layer] = torch.zeros(b, n)
            keys = self.keys[layer][:, :k].to(probs.device, probs.dtype)  # (B, K)
            self.mass[layer][:, start : start + c] = torch.einsum("bhqk,bk->bq", probs, keys).cpu() / h
            if not self.vision:
                first = torch.tensor([first_token(lay) for lay in self.layouts(n)], device=probs.device)
                index = first.clamp(max=k - 1).view(b, 1, 1, 1).expand(b, h, c, 1)
                column = probs.gather(3, index)[..., 0] * (first < k).view(b, 1, 1)  # (B, H, c); unseen: 0
                self.first_col[layer][:, :, start : start + c] = column.cpu()
            if layer in self.sink:  # rows of eager probabilities leave out the learned sink's share
                self.sink[layer][:, start : start + c] = (1 - probs.sum(-1)).mean(1).cpu()
            if self.vision and layer == self.last and start == 0:
                self.cls_row = probs[:, :, 0, :].mean(1).cpu()  # (B, K)

        def reduce(probs: torch.Tensor):  # the eager path: the whole matrix of one layer
            absorb(probs, 0)
            return None

        return absorb, reduce

    def query_gate(self, layer: int, head_dim: int):
        def reduce(query: torch.Tensor):  # (B, N, H·2d) query projection with its output gate
            _, gate = self.loaded.adapter.split_query_gate(query, head_dim)
            layouts = self.layouts(query.shape[1])
            self.gate[layer] = torch.stack([torch.sigmoid(gate[i, : lay.n_tokens].float()).mean() for i, lay in enumerate(layouts)]).cpu()
            return None

        return reduce


def _share_of(mass: torch.Tensor, keys: torch.Tensor, layout: TokenLayout, body: torch.Tensor) -> tuple[float, float, float]:
    """Attention mass on outlier ``keys`` (N,) bool from CLS, body queries and all queries, given each query's mass (N,)."""
    if not keys.any():
        return float("nan"), float("nan"), float("nan")
    queries = torch.ones_like(keys)
    queries[layout.appended] = False
    queries &= ~keys
    body = body & ~keys
    cls = float(mass[0]) if layout.n_cls else float("nan")
    return cls, float(mass[body].mean()) if body.any() else float("nan"), float(mass[queries].mean())


def _chunking(chunk: int | None, kwargs: dict, model: torch.nn.Module) -> bool:
    """Whether to run attention in query chunks: when asked (chunk > 0), or, by default (0), when one layer's
    probabilities (B x H x n x n float32) would pass ``CHUNK_BYTES``; never with None."""
    if chunk is None:
        return False
    if chunk > 0:
        return True
    batch, n = kwargs["input_ids"].shape
    heads = getattr(getattr(model, "config", None), "num_attention_heads", 1) or 1
    return 4 * batch * heads * n * n > CHUNK_BYTES


def _shares(attn: torch.Tensor, keys: torch.Tensor, layout: TokenLayout, body: torch.Tensor):
    """Attention mass landing on outlier ``keys`` (N,) bool from CLS, body queries and all queries.

    ``attn``: (N, N) attention of one input at one layer, mean over heads.
    """
    return _share_of(attn[:, keys].sum(-1) if keys.any() else attn[:, 0], keys, layout, body)


def _head_dim(module: torch.nn.Module, model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@torch.no_grad()
def measure_batch(
    loaded: Loaded,
    batch: Sequence[ImageInput] | Sequence[TextInput],
    settings: ScanSettings,
    *,
    intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[InputRecord]:
    """Run one batch with reducing hooks and turn what they kept into per-input records.

    ``intervention``: a factory of a context manager that edits the model while the batch runs
    (e.g. test-time registers); tokens it adds are placed by its ``layout`` and kept out of the body.
    Text attention runs in query chunks (``settings.attention_chunk``) where the family allows it.
    """
    model, adapter = loaded.model, loaded.adapter
    n_layers = adapter.num_layers(model)
    layers = list(settings.layers) if settings.layers is not None else list(range(n_layers))
    vision = loaded.modality is Modality.VISION
    prepared = prepare_batch(loaded, batch, image_size=settings.image_size, max_tokens=settings.max_tokens)
    kwargs = to_model(prepared.kwargs, model)
    width = kwargs["input_ids"].shape[1] if not vision else None
    hws = prepared.image_hw if isinstance(prepared.image_hw, list) else [prepared.image_hw] * len(batch)
    layout_of = getattr(intervention, "layout", None)  # an intervention that adds tokens says where

    @functools.lru_cache(maxsize=8)
    def layouts(n_total: int) -> list[TokenLayout]:
        result = []
        for i in range(len(batch)):
            n = n_total if vision else prepared.lengths[i] + n_total - width  # tokens an intervention added stay
            if layout_of is not None:
                result.append(layout_of(n, hws[i]))
            elif vision:
                result.append(adapter.layout(model, n, hws[i], grid=prepared.grids[i] if prepared.grids else None))
            else:
                result.append(TokenLayout(n, adapter.n_cls))
        return result

    collector = _Collector(loaded, settings, layouts, max(layers) + 1)
    capture: dict = {adapter.residual_site(layer): collector.residual(layer) for layer in layers}
    with_attention = [layer for layer in layers if adapter.has_attention(model, layer)] if settings.attention else []
    modules = {layer: model.get_submodule(f"{adapter.block(layer)}.{adapter.attention}") for layer in with_attention}
    chunked = not vision and adapter.causal and _chunking(settings.attention_chunk, kwargs, model) and supports_chunking(model, list(modules.values()))
    listeners = {}
    for layer in with_attention:
        capture[adapter.block_input_site(layer)] = collector.block_input(layer)
        absorb, reduce = collector.attention(layer)
        if chunked:
            listeners[modules[layer]] = absorb
        else:
            capture[adapter.attention_site(layer)] = reduce
        if adapter.gate and adapter.qkv:
            capture[f"{adapter.block(layer)}.{adapter.qkv[0]}:output"] = collector.query_gate(layer, _head_dim(modules[layer], model))
    if vision and adapter.patch_embed is not None:
        capture[adapter.patch_embed_site()] = None

    if chunked:
        attention_ctx = chunked_attention(model, listeners, chunk=settings.attention_chunk)
    else:
        attention_ctx = eager_attention(model) if with_attention else contextlib.nullcontext()
    edit_ctx = intervention() if intervention is not None else contextlib.nullcontext()
    rope_ctx = rope_scaled(model, settings.rope_scale) if settings.rope_scale != 1 else contextlib.nullcontext()
    # the forward ends after the last scanned block: no logits (n x vocabulary) nor unscanned layers
    with rope_ctx, attention_ctx, edit_ctx, hooks(model, capture=capture) as rec, stop_after(model, adapter.block(max(layers))):
        model(**kwargs)
    patch_embeddings = rec[adapter.patch_embed_site()] if vision and adapter.patch_embed is not None else None

    n_total = collector.norms[layers[0]].shape[1]
    records = []
    for i, (item, layout) in enumerate(zip(batch, layouts(n_total))):
        n = layout.n_tokens
        body = body_tokens(layout, text=not vision)
        norms = torch.stack([collector.norms[layer][i, :n] for layer in layers])  # (L, N)
        tau, outliers, medians = _outlier_masks(norms, body, settings.rule)
        image_hw = tuple(hws[i]) if vision else None
        record = InputRecord(item.name, layout, layers, body, norms, tau, outliers, medians, image_hw=image_hw)
        for layer in layers:
            record.massive.extend(collector.massive[layer][i])

        if settings.attention:
            nan = float("nan")
            shares, first, alphas, sinks, gates = [], [], [], [], []
            heads = next((collector.first_col[layer].shape[1] for layer in with_attention if layer in collector.first_col), 1)
            for layer in layers:
                if layer not in collector.mass:  # a block without softmax attention
                    shares.append((nan, nan, nan))
                    first.append(nan)
                    alphas.append(torch.full((heads,), nan))
                    sinks.append(nan)
                    gates.append(nan)
                    continue
                shares.append(_share_of(collector.mass[layer][i, :n], collector.keys[layer][i, :n], layout, body))
                if not vision:  # the first real token (after any prepended register) is the sink
                    column = collector.first_col[layer][i, :, :n]  # (H, n)
                    if bool(((column < -0.02) | (column > 1.02)).any()):  # e.g. a T5 encoder: not softmax probabilities (bf16 rounding allowed)
                        from sinkless.errors import SinklessError

                        raise SinklessError(
                            f"the attention read at layer {layer} is not a probability (values {float(column.min()):.3g} to "
                            f"{float(column.max()):.3g}): sinkless cannot measure this architecture's attention",
                            fix="scan it with --no-attention (token norms and massive activations only)",
                        )
                    f = first_token(layout)
                    warm = f + settings.warmup
                    # defined only with queries past the warm-up: early tokens can attend to little but the
                    # first one, so a shorter text reads ~100 % by construction (NaN: not measured)
                    measured = warm < n
                    first.append(float(column[:, warm:].mean()) if measured else nan)
                    alphas.append(column[:, f:].mean(-1) if measured else torch.full((column.shape[0],), nan))  # (H,): every later query sees it
                sinks.append(float(collector.sink[layer][i, :n].mean()) if layer in collector.sink else nan)
                gates.append(float(collector.gate[layer][i]) if layer in collector.gate else nan)
            share = torch.tensor(shares, dtype=torch.float32)  # (L, 3)
            record.share_cls, record.share_body, record.share_all = share[:, 0], share[:, 1], share[:, 2]
            if not vision:
                record.first_token = torch.tensor(first)  # (L,)
                record.alpha0 = torch.stack(alphas)  # (L, H)
            if adapter.sinks:
                record.learned_sink = torch.tensor(sinks)
            if adapter.gate:
                record.attention_gate = torch.tensor(gates)
            if vision and layout.n_cls and collector.cls_row is not None and max(layers) in collector.mass:
                record.cls_attention = collector.cls_row[i, :n]  # (N,)
        if patch_embeddings is not None:
            patches = as_tokens(patch_embeddings[i : i + 1])[:, : layout.grid[0] * layout.grid[1]]  # (1, P, D)
            record.neighbor_similarity = neighbor_similarity(patches, layout.grid)[0].cpu()
        if prepared.tokens is not None:  # aligned with the sequence: tokens an intervention prepended first
            record.tokens = ["<register>"] * (n - prepared.lengths[i]) + prepared.tokens[i]
        records.append(record)
    return records
