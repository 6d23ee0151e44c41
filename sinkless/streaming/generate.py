"""Endless generation and multi-turn chat through ``model.generate()`` with a sink + window cache (Xiao et al.
2024, "Efficient Streaming Language Models with Attention Sinks").

Nothing here decodes or samples by hand: ``SinkCache`` goes into Hugging Face's own ``generate`` (every
generation option works), text comes out through its ``TextStreamer`` / ``TextIteratorStreamer``. ``Chat``
keeps one cache across turns the way transformers continues a conversation: each turn passes the whole
conversation's token ids and ``generate`` feeds only what the cache has not seen (the model's earlier
replies stay in the cache as it generated them), so a chat can run forever in ``sinks + window`` tokens of
KV memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import torch
from torch import nn

from sinkless._transformers import cache_kwarg
from sinkless.errors import SinklessError
from sinkless.streaming.cache import SinkCache

__all__ = ["Completion", "complete", "Chat"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
    """One ``generate`` call through a ``SinkCache``."""

    text: str
    tokens: int  # generated tokens
    seconds: float
    cache: SinkCache

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _check_settings(generate_kwargs: dict) -> None:
    for name in ("max_new_tokens", "top_k"):
        value = generate_kwargs.get(name)
        if value is not None and value < 0:
            raise SinklessError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    temperature = generate_kwargs.get("temperature")
    if temperature is not None and not temperature >= 0:  # also NaN
        raise SinklessError(f"--temperature must be >= 0, got {temperature}")
    penalty = generate_kwargs.get("repetition_penalty")
    if penalty is not None and not (penalty > 0 and math.isfinite(penalty)):  # transformers divides by it
        raise SinklessError(f"--repetition-penalty must be > 0, got {penalty}", fix="1 switches it off; > 1 discourages repeats")
    top_p = generate_kwargs.get("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise SinklessError(f"--top-p must be in (0, 1], got {top_p}")


def sampling_kwargs(*, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float | None = None) -> dict:
    """``generate`` keyword arguments for the CLI's sampling flags: greedy when ``temperature`` is 0."""
    kwargs = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
        kwargs.update({k: v for k, v in (("top_k", top_k), ("top_p", top_p)) if v is not None})
    if repetition_penalty is not None and repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    _check_settings(kwargs)
    return kwargs


def _generate(model: nn.Module, ids: torch.Tensor, cache: SinkCache, streamer, seed: int | None, generate_kwargs: dict) -> torch.Tensor:
    _check_settings(generate_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, streamer=streamer, **{cache_kwarg(model): cache}, **generate_kwargs)


def complete(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    sinks: int = 4,
    window: int = 1020,
    chunk_size: int = 512,
    streamer=None,
    seed: int | None = 0,
    **generate_kwargs,
) -> Completion:
    """Continue ``prompt`` with ``model.generate`` through a fresh ``SinkCache``; ``generate_kwargs`` go to ``generate``."""
    from sinkless.streaming.text import tokenize

    ids = tokenize(tokenizer, prompt)[None]  # (1, N)
    if ids.shape[1] == 0:
        raise SinklessError("the prompt is empty", fix="pass --prompt TEXT or pipe a file on standard input")
    cache = SinkCache(model, sinks=sinks, window=window, chunk_size=chunk_size)
    start = time.perf_counter()
    out = _generate(model, ids, cache, streamer, seed, generate_kwargs)  # (1, N + new)
    new = out[0, ids.shape[1] :]
    return Completion(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), time.perf_counter() - start, cache)


class Chat:
    """A multi-turn chat with an instruct model whose history lives in one ``SinkCache``.

    ``send(text, streamer=...)`` returns the reply (and streams it); ``generate_kwargs`` go to ``generate``.
    """

    def __init__(self, model: nn.Module, tokenizer, *, sinks: int = 4, window: int = 1020, chunk_size: int = 512,
                 system: str | None = None) -> None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise SinklessError("this model's tokenizer has no chat template", fix="use an instruct model for --chat, or drop --chat")
        self.model, self.tokenizer = model, tokenizer
        self.cache = SinkCache(model, sinks=sinks, window=window, chunk_size=chunk_size)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._fed = ""  # the rendered conversation that self.ids holds
        self.ids = torch.zeros(1, 0, dtype=torch.long)  # (1, L) every token so far (the last reply token not yet fed)

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def send(self, text: str, *, streamer=None, seed: int | None = None, **generate_kwargs) -> Completion:
        self.messages.append({"role": "user", "content": text})
        rendered = self._render(self.messages)
        same = len(os.path.commonprefix([rendered, self._fed]))
        if same < len(self._fed):  # a template that rewrites earlier turns (e.g. strips a reply): feed what differs
            log.debug("the chat template re-renders earlier turns differently from %d characters on", same)
        new = rendered[same:]
        new_ids = torch.tensor([self.tokenizer(new, add_special_tokens=False).input_ids], dtype=torch.long)
        ids = torch.cat([self.ids, new_ids], 1)  # (1, L + n): generate feeds only what the cache has not seen
        start = time.perf_counter()
        try:
            out = _generate(self.model, ids, self.cache, streamer, seed, generate_kwargs)
        except BaseException:  # interrupted (Ctrl-C) or failed: forget the unanswered turn, re-feed the rest next time
            self.messages.pop()
            self.cache.reset()
            self.ids, self._fed = self.ids[:, :0], ""
            raise
        reply = out[0, ids.shape[1] :]
        self.ids = out
        content = self.tokenizer.decode(reply, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": content})
        self._fed = rendered + self.tokenizer.decode(reply, skip_special_tokens=False)
        return Completion(content, int(reply.numel()), time.perf_counter() - start, self.cache)
