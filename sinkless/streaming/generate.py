"""Endless generation and multi-turn chat through a sink + window cache (Xiao et al. 2024, "Efficient
Streaming Language Models with Attention Sinks").

The prompt is prefilled in chunks through ``SinkCache`` (so a prompt longer than the window is windowed
from its first token), then tokens are decoded one at a time; memory stays at ``sinks + window`` tokens
of KV however long the stream runs. ``Chat`` keeps one cache across turns: each turn feeds only the new
part of the chat template, the model's earlier replies stay in the cache as it generated them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch
from torch import nn

from sinkless.errors import SinklessError
from sinkless.streaming.cache import SinkCache, streaming_forward

__all__ = ["Sampling", "generate_tokens", "Detokenizer", "Chat", "eos_ids"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is 0, else sampled with a seeded generator."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    chunk_size: int = 512  # prefill tokens per forward

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.chunk_size < 1:
            raise SinklessError(
                "bad generation settings",
                fix="use --max-new-tokens >= 0, --temperature >= 0 and --chunk-size >= 1",
            )


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from last-position logits ``(V,)``."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    cache: SinkCache,
    prompt_ids: torch.Tensor,
    sampling: Sampling = Sampling(),
    *,
    stop: set[int] | frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Feed ``prompt_ids`` ``(N,)`` through ``cache`` in chunks, then yield generated token ids.

    Stops after ``sampling.max_new_tokens`` tokens or a token in ``stop`` (yielded). The last yielded token
    is *not* fed to the cache: a caller that continues the stream feeds it first (``Chat`` does).
    """
    ids = prompt_ids.reshape(1, -1).to(next(model.parameters()).device)  # (1, N)
    if ids.shape[1] == 0:
        raise SinklessError("the prompt is empty", fix="pass --prompt TEXT or pipe a file on standard input")
    generator = torch.Generator().manual_seed(sampling.seed)
    logits = None
    for i in range(0, ids.shape[1], sampling.chunk_size):
        logits = streaming_forward(model, cache, ids[:, i : i + sampling.chunk_size], logits_to_keep=1).logits[0, -1]
    for step in range(sampling.max_new_tokens):
        token = _pick(logits, sampling, generator)
        yield token
        if token in stop or step == sampling.max_new_tokens - 1:
            return
        logits = streaming_forward(model, cache, torch.tensor([[token]], device=ids.device), logits_to_keep=1).logits[0, -1]


class Detokenizer:
    """Turns a stream of token ids into text pieces as soon as they decode to whole characters."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self._ids: list[int] = []
        self._printed = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        piece = text[self._printed :]
        if text.endswith("\n"):  # decode from scratch after each line, so the cost stays per line
            self._ids, self._printed = [], 0
        else:
            self._printed = len(text)
        return piece


class Chat:
    """A multi-turn chat with an instruct model whose history lives in one ``SinkCache``.

    ``send(text)`` yields the reply as text pieces; the conversation can run forever in constant memory.
    """

    def __init__(self, model: nn.Module, tokenizer, *, sinks: int = 4, window: int = 1020, system: str | None = None) -> None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise SinklessError("this model's tokenizer has no chat template", fix="use an instruct model for --chat, or drop --chat")
        self.model, self.tokenizer = model, tokenizer
        self.cache = SinkCache(model, sinks=sinks, window=window)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._fed = ""  # the rendered conversation the cache (plus _pending) has seen
        self._pending: list[int] = []  # generated but not yet fed to the cache
        self.stop = eos_ids(model, tokenizer)

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def send(self, text: str, sampling: Sampling = Sampling()) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        rendered = self._render(self.messages)
        if rendered.startswith(self._fed):
            new = rendered[len(self._fed) :]
        else:  # a template that rewrites earlier turns: feed this turn alone
            log.warning("the chat template changed earlier turns; feeding the new turn only")
            new = self._render(self.messages[-1:])
        ids = self._pending + self.tokenizer(new, add_special_tokens=False).input_ids
        reply: list[int] = []
        detok = Detokenizer(self.tokenizer)
        for token in generate_tokens(self.model, self.cache, torch.tensor(ids), sampling, stop=self.stop):
            reply.append(token)
            piece = detok.push(token)
            if piece:
                yield piece
        self._pending = reply[-1:]
        content = self.tokenizer.decode(reply, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": content})
        self._fed = rendered + self.tokenizer.decode(reply, skip_special_tokens=False)
