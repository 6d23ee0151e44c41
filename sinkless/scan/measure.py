"""One forward pass per batch, with hooks on every block: per-input, per-layer measurements.

Everything is computed per input (thresholds included), so a scan gives the same numbers whatever
the batch size. Attention metrics follow Xiao et al. 2024 (first-token share), Gu et al. 2025
(Sink_eps) and Sun et al. 2024 (massive activations); norms and outliers follow Darcet et al. 2024.

Shapes: B inputs, H heads, N tokens, D width, L scanned layers, P body tokens (patches / text tokens).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sinkless.adapters import Modality, TokenLayout, eager_attention
from sinkless.hooks import hooks
from sinkless.images import to_pixels
from sinkless.patches import neighbor_similarity
from sinkless.scan.inputs import ImageInput, TextInput
from sinkless.scan.norms import OutlierRule, thresholds
from sinkless.zoo import Loaded

__all__ = ["ScanSettings", "InputRecord", "measure_batch", "parse_layers"]


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


def _shares(attn: torch.Tensor, keys: torch.Tensor, layout: TokenLayout, body: torch.Tensor):
    """Attention mass landing on outlier ``keys`` (N,) bool, from CLS, body queries and all queries.

    ``attn``: (N, N) attention of one input at one layer, mean over heads.
    """
    if not keys.any():
        return float("nan"), float("nan"), float("nan")
    mass = attn[:, keys].sum(-1)  # (N,) mass each query sends to the outliers
    queries = torch.ones_like(keys)
    queries[layout.appended] = False
    queries &= ~keys
    body = body & ~keys
    cls = float(mass[0]) if layout.n_cls else float("nan")
    return cls, float(mass[body].mean()) if body.any() else float("nan"), float(mass[queries].mean())


def _massive(residual: torch.Tensor, layer: int, settings: ScanSettings) -> list[dict]:
    """Entries with |a| > massive_abs and > massive_rel x the layer's median |a|: (N, D) one input."""
    magnitude = residual.abs()
    floor = max(settings.massive_abs, settings.massive_rel * float(magnitude.median()))
    hits = (magnitude > floor).nonzero()
    if len(hits) == 0:
        return []
    values = residual[hits[:, 0], hits[:, 1]]
    order = values.abs().argsort(descending=True)[: settings.massive_per_layer]
    return [{"layer": layer, "token": int(hits[i, 0]), "channel": int(hits[i, 1]), "value": float(values[i])} for i in order]


def model_inputs(loaded: Loaded, batch, settings: ScanSettings):
    """Model kwargs, per-input lengths/image sizes and decoded tokens for a batch."""
    if loaded.modality is Modality.VISION:
        spec = loaded.image_spec
        size = settings.image_size or spec.size
        size = size // spec.patch_size * spec.patch_size
        pixels = to_pixels([item.image for item in batch], spec, size)
        return {"pixel_values": pixels}, [None] * len(batch), (size, size), None
    tok = loaded.tokenizer
    encoded = [tok(item.text, truncation=True, max_length=settings.max_tokens)["input_ids"] for item in batch]
    lengths = [len(ids) for ids in encoded]
    width = max(lengths)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(encoded):  # right padding: real tokens never attend to pads in a causal LM
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    tokens = [[tok.decode([t]) for t in seq] for seq in encoded]
    return {"input_ids": ids, "attention_mask": mask}, lengths, None, tokens


@torch.no_grad()
def measure_batch(
    loaded: Loaded,
    batch: Sequence[ImageInput] | Sequence[TextInput],
    settings: ScanSettings,
    *,
    intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[InputRecord]:
    """Run one batch with capture hooks and turn the captures into per-input records.

    ``intervention``: a factory of a context manager that edits the model while the batch runs
    (e.g. test-time registers); tokens it appends at the end are excluded from the body by the layout.
    """
    model, adapter = loaded.model, loaded.adapter
    n_layers = adapter.num_layers(model)
    layers = list(settings.layers) if settings.layers is not None else list(range(n_layers))
    vision = loaded.modality is Modality.VISION
    kwargs, lengths, image_hw, tokens = model_inputs(loaded, batch, settings)

    residual_sites = {layer: adapter.residual_site(layer) for layer in layers}
    attention_sites = {layer: adapter.attention_site(layer) for layer in layers} if settings.attention else {}
    capture: dict = {site: None for site in residual_sites.values()}
    # attention kept per head for text (Sink_eps), averaged over heads for vision (memory)
    reduce_heads = (lambda a: a.mean(1)) if vision else None
    capture.update({site: reduce_heads for site in attention_sites.values()})
    if layers and layers[0] > 0 and settings.attention:
        capture[adapter.residual_site(layers[0] - 1)] = None  # outliers in the first scanned layer's input
    elif settings.attention:
        capture[adapter.block_input_site(0)] = None
    if vision and adapter.patch_embed is not None:
        capture[adapter.patch_embed_site()] = None

    attention_ctx = eager_attention(model) if settings.attention else contextlib.nullcontext()
    edit_ctx = intervention() if intervention is not None else contextlib.nullcontext()
    with attention_ctx, edit_ctx, hooks(model, capture=capture) as rec:
        model(**kwargs)

    layout_of = getattr(intervention, "layout", None)  # an intervention that adds tokens says where
    records = []
    for i, item in enumerate(batch):
        residuals = [rec[residual_sites[layer]][i] for layer in layers]  # L x (N, D)
        if not vision:  # drop right padding; tokens an intervention prepended stay
            extra = residuals[0].shape[0] - kwargs["input_ids"].shape[1]
            residuals = [r[: lengths[i] + extra] for r in residuals]
        n_tokens = residuals[0].shape[0]
        if layout_of is not None:
            layout = layout_of(n_tokens, image_hw)
        else:
            layout = adapter.layout(model, n_tokens, image_hw) if vision else TokenLayout(n_tokens, adapter.n_cls)
        body = body_tokens(layout, text=not vision)
        norms = torch.stack([r.float().norm(dim=-1) for r in residuals]).cpu()  # (L, N)
        tau, outliers, medians = _outlier_masks(norms, body, settings.rule)
        record = InputRecord(item.name, layout, layers, body, norms, tau, outliers, medians, image_hw=image_hw)

        for li, layer in enumerate(layers):
            record.massive.extend(_massive(residuals[li].float().cpu(), layer, settings))

        if settings.attention:
            first_input = rec[adapter.residual_site(layers[0] - 1)] if layers[0] > 0 else rec[adapter.block_input_site(0)]
            first_input = first_input[i, :n_tokens].float().norm(dim=-1).cpu()
            _, first_keys, _ = _outlier_masks(first_input[None], body, settings.rule)
            key_masks = [first_keys[0]] + [outliers[li - 1] for li in range(1, len(layers))]
            shares = []
            for li, layer in enumerate(layers):
                attn = rec[attention_sites[layer]][i].float().cpu()
                if not vision:
                    attn = attn[:, :n_tokens, :n_tokens]  # (H, n, n) drop padding
                mean_attn = attn if vision else attn.mean(0)  # (N, N)
                shares.append(_shares(mean_attn, key_masks[li], layout, body))
                if not vision:  # the first real token (after any prepended register) is the sink
                    first = first_token(layout)
                    warm = first + settings.warmup
                    # defined only with queries past the warm-up: early tokens can attend to little but the
                    # first one, so a shorter text reads ~100 % by construction (NaN: not measured)
                    measured = warm < n_tokens
                    share0 = attn[:, warm:, first].mean()[None] if measured else torch.full((1,), float("nan"))
                    record.first_token = share0 if record.first_token is None else torch.cat([record.first_token, share0])
                    alpha = attn[:, first:, first].mean(-1)[None]  # (1, H): every later query sees it
                    if not measured:
                        alpha = torch.full_like(alpha, float("nan"))
                    record.alpha0 = alpha if record.alpha0 is None else torch.cat([record.alpha0, alpha])
            share = torch.tensor(shares, dtype=torch.float32)  # (L, 3)
            record.share_cls, record.share_body, record.share_all = share[:, 0], share[:, 1], share[:, 2]
            if vision and layout.n_cls:
                last = rec[attention_sites[layers[-1]]][i].float().cpu()
                record.cls_attention = last[0]  # (N,)
        if vision and adapter.patch_embed is not None:
            record.neighbor_similarity = neighbor_similarity(rec[adapter.patch_embed_site()][i : i + 1], layout.grid)[0].cpu()
        if tokens is not None:  # aligned with the sequence: tokens an intervention prepended first
            record.tokens = ["<register>"] * (n_tokens - lengths[i]) + tokens[i]
        records.append(record)
    return records
