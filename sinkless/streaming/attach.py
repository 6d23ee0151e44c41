"""How a ``SinkCache`` reaches the model's forward, inside ``model.generate()`` or a plain call (Xiao et al.
2024, "Efficient Streaming Language Models with Attention Sinks").

A transformers Cache only sees keys and values; StreamingLLM also needs the positions and the mask of each
step. So the first ``SinkCache`` built for a model attaches one edit of its whole call (``sinkless.hooks``,
sites ``:input[*]`` and ``:output[*]``). On a call whose cache (``past_key_values``, or ``cache`` from
transformers 5.25 on) is a ``SinkCache`` it

- reads which new tokens are real from the 2D ``attention_mask`` (padding left or right, or none), checks
  it against what the cache has seen, and refuses what it cannot honour (a 4D mask, ``position_ids`` with
  gaps, a batch of another size);
- feeds inputs longer than ``cache.chunk_size`` in chunks (exact: a long prompt is windowed from its first
  token);
- replaces ``position_ids`` and ``attention_mask`` with the cache's;
- afterwards gives a padding column the logits of its row's last real token (so right-padded prompts
  generate as if unpadded), and checks that every layer took the step.

Calls with any other cache pass through untouched. The edit is removed when the model's last
``SinkCache`` is garbage collected, leaving the model as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch
from torch import nn

from sinkless._transformers import cache_in, cache_kwarg, cache_of
from sinkless.errors import SinklessError
from sinkless.hooks import Hooks

__all__ = ["attach", "attached"]

log = logging.getLogger(__name__)

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class _Call:
    valid: torch.Tensor  # (B, n) real tokens of the part the model runs
    source: torch.Tensor | None  # (B, R) column of the model's logits for each returned column; -1: earlier call
    keep: int  # returned columns (0: all)
    prefix: list[torch.Tensor]  # logits of earlier chunks of this call, when they are returned


class _Attachment:
    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)
        self.live = 0
        self.hooks = Hooks(model, edit={":input[*]": self.before, ":output[*]": self.after})

    # -- before the forward ---------------------------------------------------------------------
    def before(self, inputs: dict) -> dict | None:
        from sinkless.streaming.cache import SinkCache

        cache = cache_in(inputs)  # past_key_values, or cache from transformers 5.25 on
        if not isinstance(cache, SinkCache):
            return None
        if getattr(cache, "_calls", None):  # left over from a forward that raised
            cache._calls.clear()
            cache.abort()
        cache._calls = getattr(cache, "_calls", [])
        name = "inputs_embeds" if inputs.get("inputs_embeds") is not None else "input_ids"
        x = inputs.get(name)
        if x is None:
            raise SinklessError("a SinkCache step needs input_ids or inputs_embeds")
        b, n = x.shape[:2]
        valid = _new_tokens(cache, inputs.get("attention_mask"), b, n, x if name == "input_ids" else None, self.model())
        _check_positions(inputs.get("position_ids"), valid)
        keep = inputs.get("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):
            raise SinklessError("logits_to_keep as a tensor of indices cannot be honoured with a SinkCache", fix="pass an int")
        keep = int(keep or 0)
        if n > cache.chunk_size and (inputs.get("output_attentions") or inputs.get("output_hidden_states")):
            raise SinklessError(
                f"attentions / hidden states of a {n}-token input fed in chunks of {cache.chunk_size} cannot be returned whole",
                fix=f"feed at most {cache.chunk_size} tokens per call, or build SinkCache(..., chunk_size={n})",
            )
        prefix = []
        last = (n - 1) % cache.chunk_size + 1  # tokens of the final chunk
        for start in range(0, n - last, cache.chunk_size):
            wanted = keep == 0 or keep > n - start - cache.chunk_size
            out = self.model()(
                **{name: x[:, start : start + cache.chunk_size]}, attention_mask=valid[:, start : start + cache.chunk_size].long(),
                **{cache_kwarg(self.model()): cache}, use_cache=True, logits_to_keep=0 if wanted else 1,
            )
            if wanted:
                prefix.append(out.logits)
        x, valid = x[:, n - last :], valid[:, n - last :]
        # the returned columns of the final chunk that are padding take their row's last real logits (a row
        # with no real token yet, e.g. in transformers' own chunked prefill, keeps its pad's meaningless ones)
        returned = valid if keep == 0 else valid[:, -min(keep, last) :]
        source = None
        if not bool(returned.all()):
            columns = torch.arange(valid.shape[1]).expand_as(valid)
            latest = torch.where(valid, columns, -1).cummax(1).values  # (B, n) last real column so far
            earlier = cache.count if cache.count is not None and cache.count.shape[0] == b else torch.zeros(b, dtype=torch.long)
            latest = torch.where((latest < 0) & (earlier == 0)[:, None], columns, latest)
            source = latest[:, -returned.shape[1] :]
            keep_model = 0
        else:
            keep_model = min(keep, last) if keep else 0
        model = self.model()
        step = cache.prepare(valid, x.device, next(model.parameters()).dtype if model is not None else None)
        cache._calls.append(_Call(valid, source, keep, prefix))
        new = {k: v for k, v in inputs.items() if k not in ("input_ids", "inputs_embeds", "cache_position")}
        new.update({name: x, "use_cache": True, "logits_to_keep": keep_model, **step})
        return new

    # -- after the forward ----------------------------------------------------------------------
    def after(self, output):
        from sinkless.streaming.cache import SinkCache

        cache = cache_of(output)
        if not isinstance(cache, SinkCache) or not getattr(cache, "_calls", None):
            return None
        call = cache._calls.pop()
        if cache.pending:
            cache.abort()
            raise RuntimeError(f"{type(self.model()).__name__} did not update all {len(cache.layers)} layers of its SinkCache")
        logits = getattr(output, "logits", None)
        if logits is None:
            return None
        if call.source is not None:
            earlier = cache.last_logits
            picked = logits.gather(1, call.source.clamp(min=0).to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1]))
            if bool((call.source < 0).any()):
                picked = torch.where((call.source < 0).to(logits.device)[:, :, None], earlier[:, None].to(logits.dtype), picked)
            logits = picked
        if call.prefix:
            logits = torch.cat([*call.prefix, logits], 1)
            logits = logits[:, -call.keep :] if call.keep else logits
        cache.last_logits = logits[:, -1]  # every row's logits after its last real token (padding carried)
        output.logits = logits
        return output


def _new_tokens(cache, mask, b: int, n: int, ids: torch.Tensor | None, model: nn.Module) -> torch.Tensor:
    """``(B, n)`` bool on the CPU: which new columns are real tokens, from the 2D padding mask."""
    if mask is None:
        if b > 1 and cache.columns == 0 and ids is not None:
            _warn_if_padded(ids, model)
        return torch.ones(b, n, dtype=torch.bool)
    if isinstance(mask, dict) or mask.dim() != 2:
        raise SinklessError(
            "a SinkCache builds each step's 4D mask itself and was given a prepared one",
            fix="pass the 2D padding mask (1 = token, 0 = padding) as attention_mask",
        )
    if mask.shape[0] != b:
        raise SinklessError(f"attention_mask has {mask.shape[0]} rows for a batch of {b}")
    seen = cache.columns
    if mask.shape[1] == seen + n and seen:
        history, new = mask[:, :seen], mask[:, seen:]
        real = history.long().sum(1).cpu()
        if cache.count is not None and not torch.equal(real, cache.count):
            raise SinklessError(
                f"attention_mask says the rows have {real.tolist()} real tokens before these {n}, "
                f"but this SinkCache has streamed {cache.count.tolist()}",
                fix="pass the mask of everything fed to this cache plus the new tokens (or only the new tokens' mask)",
            )
    elif mask.shape[1] == n:
        new = mask
    else:
        raise SinklessError(
            f"attention_mask has {mask.shape[1]} columns for {n} new tokens after {seen} seen by this SinkCache",
            fix=f"pass a mask of {seen + n} columns (everything so far) or {n} (the new tokens)",
        )
    return new.bool().cpu()


def _warn_if_padded(ids: torch.Tensor, model: nn.Module) -> None:
    config = getattr(model, "generation_config", None) or model.config
    pad, bos = getattr(config, "pad_token_id", None), getattr(config, "bos_token_id", None)
    if isinstance(pad, int) and pad != bos:
        edges = torch.stack([ids[:, 0], ids[:, -1]], 1) == pad  # (B, 2)
        if bool(edges.any()) and not bool(edges.all()):
            log.warning("some rows start or end with the pad token %d but no attention_mask was given: pads count as tokens", pad)


def _check_positions(position_ids: torch.Tensor | None, valid: torch.Tensor) -> None:
    """position_ids may number the tokens from anywhere, but consecutively over the real tokens of each row."""
    if position_ids is None or valid.shape[1] == 1:
        return
    if position_ids.dim() != 2:
        raise SinklessError(f"position_ids of shape {tuple(position_ids.shape)} cannot be honoured by a SinkCache", fix="pass 2D position_ids or none")
    if position_ids.shape[1] != valid.shape[1]:  # e.g. generate() given a prompt shorter than what the cache has seen
        raise SinklessError(
            f"this call brings {valid.shape[1]} new token(s) but {position_ids.shape[1]} positions: the input does not continue "
            "what the SinkCache has seen (generate() with a reused cache takes the whole conversation so far as its prompt)",
            fix="pass the conversation so far as the prompt, or start afresh with cache.reset() (or a new SinkCache)",
        )
    given = position_ids.cpu().expand(valid.shape[0], -1)
    relative = torch.where(valid, given - valid.long().cumsum(1), 0)  # constant over real tokens when consecutive
    first = relative.gather(1, valid.int().argmax(1, keepdim=True))
    if bool((valid & (relative != first)).any()):
        raise SinklessError(
            "position_ids skip or repeat positions (packed sequences?); a SinkCache numbers each row's tokens itself",
            fix="leave position_ids out, and mark padding with attention_mask",
        )


def attach(model: nn.Module, cache) -> None:
    """Attach the input/output edit to ``model`` (once) for as long as ``cache`` or another SinkCache of it lives."""
    attachment = _ATTACHED.get(model)
    if attachment is None:
        attachment = _ATTACHED[model] = _Attachment(model)
    attachment.live += 1
    cache._calls = []
    weakref.finalize(cache, _release, weakref.ref(model))


def _release(model_ref) -> None:
    model = model_ref()
    attachment = _ATTACHED.get(model) if model is not None else None
    if attachment is None:
        return
    attachment.live -= 1
    if attachment.live <= 0:
        attachment.hooks.remove()
        del _ATTACHED[model]


def attached(model: nn.Module) -> bool:
    """Whether a SinkCache edit is on ``model`` now."""
    return model in _ATTACHED
