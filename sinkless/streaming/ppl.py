"""Streaming perplexity: the per-token negative log-likelihood of a long text under the four attention
regimes compared by Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks".

- ``full``: the plain model with an unbounded cache (context grows with the text).
- ``window``: the cached states of the ``W`` tokens before it only (``S = 0``); collapses once token 0 is
  evicted.
- ``sink``: the first ``S`` tokens plus the ``W`` before it (StreamingLLM), through ``SinkCache``.
- ``recompute``: for every token, re-encode it with the ``W`` tokens before it (after ``S`` sinks, default
  0) from scratch: the quality baseline StreamingLLM is compared against, ``W`` times the compute.

Counting is the paper's: every token also sees itself, so ``--sinks 4 --window 1020`` keeps 1024 tokens
between steps and attends to 1025. The NLL is computed in float32 on the ``(n, V)`` layout (the
``(B, V, n)`` layout of ``cross_entropy`` comes out ~1e-4 nats/token low on the CPU against float64).

Each token is predicted from exactly the context its regime allows, whether the text is fed token by
token or in chunks (the chunked results are identical). ``batch_size`` streams run side by side: the
text is cut into that many consecutive streams, each starting fresh.

Legend: B streams, L scored tokens per stream, n chunk, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from sinkless._io import atomic_path
from sinkless._transformers import cache_kwarg
from sinkless._version import __version__
from sinkless.errors import SinklessError
from sinkless.streaming.architecture import check_streamable
from sinkless.streaming.cache import SinkCache

__all__ = [
    "Mode",
    "PplConfig",
    "PplResult",
    "perplexity",
    "nll_full",
    "nll_streaming",
    "nll_recompute",
    "split_streams",
    "running_ppl",
    "plot_running_ppl",
    "peak_rss_mb",
]

log = logging.getLogger(__name__)

Intervention = Callable[[nn.Module], AbstractContextManager]
"""A factory of a context manager entered around the whole run (e.g. an edit of the model's forward)."""


class Mode(str, enum.Enum):
    FULL = "full"
    WINDOW = "window"
    SINK = "sink"
    RECOMPUTE = "recompute"


DEFAULT_CHUNK = {Mode.FULL: 256, Mode.WINDOW: 64, Mode.SINK: 64, Mode.RECOMPUTE: 8}


@dataclasses.dataclass(frozen=True)
class PplConfig:
    """Settings of one run. ``sinks``/``window`` None take the mode's defaults; ``chunk_size`` is tokens per
    forward (recompute: windows per forward per stream); ``every`` scores one token in ``every`` (recompute only)."""

    mode: Mode = Mode.SINK
    sinks: int | None = None
    window: int | None = 1020
    batch_size: int = 1
    chunk_size: int | None = None
    every: int = 1
    max_tokens: int | None = None

    def resolved(self) -> PplConfig:
        mode = Mode(self.mode)
        if self.batch_size < 1 or (self.chunk_size is not None and self.chunk_size < 1) or self.every < 1:
            raise SinklessError("--batch-size, --chunk-size and --every must be >= 1")
        if self.every > 1 and mode is not Mode.RECOMPUTE:
            raise SinklessError("--every only applies to --mode recompute", fix="leave --every out for the other modes")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SinklessError("--max-tokens must be >= 1")
        chunk = self.chunk_size or DEFAULT_CHUNK[mode]
        if mode is Mode.FULL:
            return dataclasses.replace(self, mode=mode, sinks=None, window=None, chunk_size=chunk)
        if self.window is None or self.window < 1:
            raise SinklessError(f"--mode {mode.value} needs --window >= 1")
        sinks = self.sinks
        if mode is Mode.WINDOW:
            if sinks:
                raise SinklessError("--mode window keeps no sinks (S = 0)", fix="use --mode sink for sinks, or drop --sinks")
            sinks = 0
        elif sinks is None:
            sinks = 4 if mode is Mode.SINK else 0
        if sinks < 0:
            raise SinklessError(f"--sinks must be >= 0, got {sinks}")
        return dataclasses.replace(self, mode=mode, sinks=sinks, chunk_size=chunk)


@dataclasses.dataclass
class PplResult:
    """One run: the settings, the perplexity and the per-token NLL in text order."""

    model: str
    mode: str
    sinks: int | None
    window: int | None
    tokens: int  # scored tokens
    ppl: float
    tokens_per_second: float
    peak_rss_mb: float
    nll_curve: list[float]
    batch_size: int = 1
    chunk_size: int = 1
    every: int = 1
    seconds: float = 0.0
    text: str = ""
    scored_positions: list[int] | None = None  # text position predicted from, when not every token is scored
    device: str = ""
    dtype: str = ""
    sinkless_version: str = __version__
    torch_threads: int = dataclasses.field(default_factory=torch.get_num_threads)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["scored_positions"] is None:
            del data["scored_positions"]
        return data


# -- helpers --------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_streams(tokens: torch.Tensor, batch_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """``(B, L + 1)`` consecutive streams of ``tokens`` ``(N,)``; stream b scores text tokens ``b L + 1 .. (b + 1) L``."""
    n_scored = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens) - 1)
    per_stream = n_scored // batch_size
    if per_stream < 1:
        raise SinklessError(
            f"the text has {len(tokens)} tokens: too few for {batch_size} stream(s)",
            fix="use a longer --text, a smaller --batch-size, or a larger --max-tokens",
        )
    starts = torch.arange(batch_size) * per_stream
    return torch.stack([tokens[s : s + per_stream + 1] for s in starts.tolist()])  # (B, L + 1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``(B, n)`` of ``targets`` under ``logits`` ``(B, n, V)``, on the ``(B n, V)`` layout."""
    b, n, v = logits.shape
    return F.cross_entropy(logits.float().reshape(b * n, v), targets.reshape(b * n), reduction="none").view(b, n)


def _bar(total: int, progress: bool, desc: str):
    return tqdm(total=total, disable=not progress, desc=desc, unit="tok", dynamic_ncols=True, leave=False)


def _chunked(model: nn.Module, ids: torch.Tensor, chunk: int, forward: Callable, progress: bool, desc: str) -> torch.Tensor:
    """NLL ``(B, L)`` of ``ids[:, 1:]`` feeding ``ids[:, :-1]`` in chunks through ``forward(chunk_ids) -> logits``."""
    n = ids.shape[1] - 1
    out, total = [], 0.0
    with _bar(n, progress, desc) as bar:
        for i in range(0, n, chunk):
            x = ids[:, i : min(i + chunk, n)]  # (B, n)
            nll = _nll(forward(x), ids[:, i + 1 : i + 1 + x.shape[1]])  # (B, n)
            out.append(nll)
            total += float(nll.sum())
            bar.update(x.shape[1])
            bar.set_postfix(ppl=f"{math.exp(total / (sum(o.numel() for o in out))):.2f}")
    return torch.cat(out, dim=1)


# -- the three mode families ----------------------------------------------------------------------
@torch.no_grad()
def nll_full(model: nn.Module, ids: torch.Tensor, *, chunk_size: int = 256, progress: bool = False) -> torch.Tensor:
    """``full``: per-token NLL ``(B, L)`` with every earlier token in context (an ordinary growing cache)."""
    cache, name = DynamicCache(config=model.config), cache_kwarg(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, use_cache=True, **{name: cache}).logits

    return _chunked(model, ids, chunk_size, forward, progress, "full")


@torch.no_grad()
def nll_streaming(
    model: nn.Module, ids: torch.Tensor, *, sinks: int, window: int, chunk_size: int = 64, progress: bool = False
) -> torch.Tensor:
    """``sink`` (``sinks > 0``) and ``window`` (``sinks = 0``): per-token NLL ``(B, L)`` through a ``SinkCache``."""
    cache, name = SinkCache(model, sinks=sinks, window=window, chunk_size=chunk_size), cache_kwarg(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, use_cache=True, **{name: cache}).logits

    return _chunked(model, ids, chunk_size, forward, progress, "sink" if sinks else "window")


@torch.no_grad()
def nll_recompute(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int,
    sinks: int = 0,
    chunk_size: int = 8,
    every: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``recompute``: for each scored position j, a fresh forward over the first ``sinks`` tokens, the
    ``window`` tokens before j and j itself, at positions ``0..len-1``; NLL of token j + 1 from its last logits.

    Returns the NLL ``(B, L')`` and the scored positions ``(L',)`` (every ``every``-th position).
    """
    n = ids.shape[1] - 1
    positions = torch.arange(0, n, every)  # (L',)
    span = sinks + window + 1  # context length once the window is full
    early, steady = positions[positions < span - 1], positions[positions >= span - 1]
    out = []
    with _bar(len(positions), progress, "recompute") as bar:
        if len(early):  # before anything is evicted, one causal forward gives every early prediction
            stop = int(early[-1]) + 1
            logits = model(input_ids=ids[:, :stop]).logits  # (B, stop, V)
            out.append(_nll(logits[:, early.to(ids.device)], ids[:, (early + 1).to(ids.device)]))
            bar.update(len(early))
        recent = torch.arange(-window, 1)  # (W + 1,) offsets of the window and itself from the scored position
        for i in range(0, len(steady), chunk_size):
            j = steady[i : i + chunk_size]  # (n,)
            index = torch.cat([torch.arange(sinks).expand(len(j), sinks), j[:, None] + recent[None, :]], dim=1)  # (n, span)
            contexts = ids[:, index.to(ids.device)]  # (B, n, span)
            b, k = contexts.shape[:2]
            logits = model(input_ids=contexts.reshape(b * k, span), logits_to_keep=1).logits  # (B*n, 1, V)
            out.append(_nll(logits.reshape(b, k, -1), ids[:, (j + 1).to(ids.device)]))
            bar.update(k)
    return torch.cat(out, dim=1), positions


# -- one run --------------------------------------------------------------------------------------
def _run_full(model: nn.Module, ids: torch.Tensor, config: PplConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return nll_full(model, ids, chunk_size=config.chunk_size, progress=progress), torch.arange(ids.shape[1] - 1)


def _run_streaming(model: nn.Module, ids: torch.Tensor, config: PplConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    nll = nll_streaming(model, ids, sinks=config.sinks, window=config.window, chunk_size=config.chunk_size, progress=progress)
    return nll, torch.arange(ids.shape[1] - 1)


def _run_recompute(model: nn.Module, ids: torch.Tensor, config: PplConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return nll_recompute(
        model, ids, window=config.window, sinks=config.sinks, chunk_size=config.chunk_size, every=config.every, progress=progress
    )


_RUNNERS = {Mode.FULL: _run_full, Mode.WINDOW: _run_streaming, Mode.SINK: _run_streaming, Mode.RECOMPUTE: _run_recompute}
"""Each mode's NLL ``(B, L')`` and scored positions ``(L',)`` within a stream."""


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    config: PplConfig = PplConfig(),
    *,
    model_name: str = "",
    text_name: str = "",
    intervention: Intervention | None = None,
    progress: bool = True,
) -> PplResult:
    """Perplexity of ``tokens`` ``(N,)`` under ``config.mode``; ``intervention(model)`` (a context manager) wraps the run."""
    config = config.resolved()
    if config.mode in (Mode.SINK, Mode.WINDOW):
        check_streamable(model, config.sinks, config.window)
    torch.manual_seed(0)
    device = next(model.parameters()).device
    streams = split_streams(tokens, config.batch_size, config.max_tokens).to(device)  # (B, L + 1)
    log.info(
        "%s: %s mode, sinks=%s window=%s, %d stream(s) x %d tokens, chunk %d",
        model_name or type(model).__name__, config.mode.value, config.sinks, config.window,
        streams.shape[0], streams.shape[1] - 1, config.chunk_size,
    )
    wrap = intervention(model) if intervention is not None else contextlib.nullcontext()
    start = time.perf_counter()
    with wrap:
        nll, positions = _RUNNERS[config.mode](model, streams, config, progress)  # (B, L'), (L',)
    seconds = time.perf_counter() - start
    per_stream = streams.shape[1] - 1
    text_positions = (torch.arange(streams.shape[0])[:, None] * per_stream + positions[None, :]).flatten()
    curve = nll.flatten().cpu()  # stream by stream = text order
    return PplResult(
        model=model_name or type(model).__name__,
        mode=config.mode.value,
        sinks=config.sinks,
        window=config.window,
        tokens=curve.numel(),
        ppl=math.exp(float(curve.double().mean())),
        tokens_per_second=curve.numel() / seconds,
        peak_rss_mb=peak_rss_mb(),
        nll_curve=[round(v, 5) for v in curve.tolist()],
        batch_size=config.batch_size,
        chunk_size=config.chunk_size,
        every=config.every,
        seconds=seconds,
        text=text_name,
        scored_positions=text_positions.tolist() if config.every > 1 else None,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


# -- the running-perplexity plot ------------------------------------------------------------------
def running_ppl(nll_curve: Sequence[float]) -> torch.Tensor:
    """exp(mean NLL of the first k scored tokens), for every k."""
    nll = torch.as_tensor(nll_curve, dtype=torch.float64)
    return torch.exp(torch.cumsum(nll, 0) / torch.arange(1, len(nll) + 1))


def _label(result: dict) -> str:
    mode, every = result["mode"], result.get("every", 1)
    sinks = f"S={result['sinks']}, " if result.get("sinks") else ""
    settings = "" if mode == "full" else f" ({sinks}W={result['window']})"
    sampled = f", 1 in {every} tokens" if every > 1 else ""
    return f"{mode}{settings}: {result['ppl']:.2f}{sampled}"


def plot_running_ppl(results: Sequence[PplResult | dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """A PNG of the running perplexity of each result against the text position; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    settled = []  # running values after the first 5 % of the text, to frame the plot
    for result in results:
        data = result.to_json() if isinstance(result, PplResult) else result
        x = torch.as_tensor(data.get("scored_positions") or list(range(len(data["nll_curve"]))))
        y = running_ppl(data["nll_curve"])
        ax.plot(x.numpy(), y.numpy(), label=_label(data), linewidth=1.4)
        settled.append(y[x >= 0.05 * float(x.max())])
    if settled and any(len(v) for v in settled):
        values = torch.cat([v for v in settled if len(v)])
        ax.set_ylim(float(values.min()) / 1.3, float(values.max()) * 1.3)
    ax.set_yscale("log")
    ax.set_xlabel("text position (tokens)")
    ax.set_ylabel("running perplexity")
    ax.set_title(title or "Streaming perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
