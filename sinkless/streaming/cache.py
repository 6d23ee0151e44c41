"""A sink + window KV cache that drops into ``model.generate()`` (Xiao et al. 2024, "Efficient Streaming
Language Models with Attention Sinks").

``SinkCache`` is a transformers ``Cache``: pass it as ``past_key_values`` (``cache`` from transformers 5.25
on; the old name still works there) to ``model.generate`` (any
decoding option: sampling, top-k/p, repetition penalty, stopping criteria, streamers, beam search) or
to a plain forward. Why a Cache and not a ``custom_generate`` loop or a wrapper around ``generate``: it
keeps users on Hugging Face's own API and loop, so every generation option keeps working, and the same
object serves ``ppl`` and multi-turn chat. A Cache cannot set the positions and mask the model uses, so
the first ``SinkCache`` of a model attaches one input/output edit to it (``sinkless.streaming.attach``,
through ``sinkless.hooks``); it acts only on calls whose cache is a ``SinkCache`` and is
removed when the model's last ``SinkCache`` is garbage collected.

Counting (the paper's and transformers' former SinkCache): with ``sinks=S, window=W`` each new token
attends to the first ``S`` tokens of its stream, the ``W`` tokens before it, and itself; ``S + W`` tokens
are kept between steps ("4 + 1020": 1024 kept, 1025 attended). Positions are in-cache positions: sinks at
``0..S-1``, the newest token at ``min(t, S + W)``.

Each batch row is its own stream: the 2D ``attention_mask`` marks padding (left or right), pads are
never stored, each row's sinks are its first real tokens, and its tokens are numbered from the mask.

Why not rotate every cached key at every step (the reference implementation's choice)? Rotary attention
only sees position *differences*, so keys stay post-RoPE in a per-row *frame*: window token ``u`` sits at
rotary position ``u - frame``, which gives text distances to every query, exactly what in-cache positions
give; only the ``S`` sink keys must look closer than they are and are rotated per step (``S`` keys, not
``S + W``). When frame positions pass ``2 (S + W)`` the window is rotated back once (a *rebase*).

Storage is a slot buffer ``(B, h, C, d)``, ``C <= S + W + 1``: slots ``0..S-1`` hold the sinks (rotated for
the current step), the other slots the window in any order (attention does not care about key order, the
mask does). A one-token decode step writes its key into a free slot in place and evicts by marking a slot
free: no copy of the window per step. Steps of several tokens (prefill, padding) lay out every query's
own band in a 4D mask, with per-query rotated copies of the sinks where needed (``layout``), and are fed
in chunks of ``chunk_size``: a prompt longer than the window is windowed from its first token, exactly as
if fed token by token. A step is committed only when every layer has taken it, so an interrupted forward
(Ctrl-C) leaves the cache as it was.

Legend: B rows, h key/value heads, d head dim, n new tokens, C slots, K keys attended, S sinks, W window.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from sinkless.errors import SinklessError
from sinkless.streaming import layout
from sinkless.streaming.architecture import StreamSpec, check_streamable, rotation, shift_keys
from sinkless.streaming.attach import attach

__all__ = ["SinkCache"]


class SinkLayer(CacheLayerMixin):
    """One layer's slots ``(B, h, C, d)`` and its unrotated sink keys ``(B, h, S, d)``."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.sink_keys: torch.Tensor | None = None
        self.slot_offset: torch.Tensor | None = None  # (B,) rotation currently applied to the sink slots
        self.staged: tuple | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise RuntimeError("a SinkCache layer is updated through SinkCache.update")

    def ensure(self, capacity: int, sinks: int) -> None:
        """Grow the slot buffer to ``capacity`` (new slots are empty)."""
        if self.keys.shape[2] < capacity:
            b, h, c, d = self.keys.shape
            self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, capacity - c, d)], dim=2)
            self.values = torch.cat([self.values, self.values.new_zeros(b, h, capacity - c, self.values.shape[-1])], dim=2)
        if self.sink_keys is None or self.sink_keys.shape[0] != self.keys.shape[0]:
            self.sink_keys = self.keys.new_zeros(self.keys.shape[0], self.keys.shape[1], sinks, self.keys.shape[-1])
            self.slot_offset = torch.zeros(self.keys.shape[0], dtype=torch.long)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2] if self.is_initialized else query_length, 0

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.sink_keys = self.slot_offset = None
        self.staged = None
        self.is_initialized = False

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))
            if self.sink_keys is not None:
                self.sink_keys = self.sink_keys.index_select(0, index.to(self.sink_keys.device))
                self.slot_offset = self.slot_offset.index_select(0, index.cpu())


class SinkCache(Cache):
    """Keeps each stream's first ``sinks`` tokens and its last ``window`` tokens, for an unmodified HF causal LM.

    ::

        cache = SinkCache(model, sinks=4, window=1020)
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4096)
        out = model(input_ids=chunk, past_key_values=cache)    # a plain forward works too

    ``chunk_size``: longer inputs are fed in chunks of this many tokens (results do not depend on it).
    """

    def __init__(self, model: nn.Module, *, sinks: int = 4, window: int = 1020, chunk_size: int = 512) -> None:
        self.spec: StreamSpec = check_streamable(model, sinks, window)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise SinklessError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}")
        self.sinks, self.window, self.chunk_size = int(sinks), int(window), int(chunk_size)
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        super().__init__(layers=[SinkLayer(i) for i in range(self.spec.n_layers)])
        self.mask_groups = layout.groups(self)
        self._freq_groups: dict[int, list[int]] = {}  # layers sharing rotary frequencies
        for i, inv in enumerate(self.spec.inv_freq):
            self._freq_groups.setdefault(id(inv), []).append(i)
        self._clear()
        attach(model, self)

    def _clear(self) -> None:
        self.columns = 0  # padded columns seen (what generate counts)
        self.count: torch.Tensor | None = None  # (B,) real tokens seen per row
        self.frame: torch.Tensor | None = None  # (B,) window token u sits at rotary position u - frame
        self.slot_pos: torch.Tensor | None = None  # (B, C) text position held by each slot, -1 empty
        self.rebases = 0
        self.last_logits: torch.Tensor | None = None  # (B, V) each row's logits after its last real token
        self._sink_stack: torch.Tensor | None = None  # (L, B, h, S, d) every layer's sinks, when their shapes agree
        self._plan: layout.Fast | layout.General | None = None
        self._done = 0

    def __repr__(self) -> str:
        seen = None if self.count is None else self.count.tolist()
        return f"SinkCache(sinks={self.sinks}, window={self.window}, seen={seen}, kept={self.kept()})"

    # -- what it holds ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens a stream keeps between steps: ``sinks + window``."""
        return self.sinks + self.window

    @property
    def batch_size(self) -> int:
        return -1 if self.count is None else int(self.count.shape[0])

    def seen(self) -> list[int]:
        """Real tokens each row has streamed so far."""
        return [] if self.count is None else self.count.tolist()

    def kept(self) -> list[int]:
        """Tokens each row keeps now (at most ``sinks + window``)."""
        return [] if self.slot_pos is None else (self.slot_pos >= 0).sum(1).tolist()

    def kept_positions(self, t: int) -> list[int]:
        """Text positions (within a stream) that its token ``t`` attends to: the sinks, its last ``window`` tokens, itself."""
        return list(range(min(self.sinks, t + 1))) + list(range(max(self.sinks, t - self.window), t + 1))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Padded columns seen: how ``generate`` slices a continued conversation and numbers positions."""
        return self.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Only consulted when a step hands the model no mask (every slot visible): a causal mask of these sizes
        sees every slot."""
        kv = self._plan.capacity if isinstance(self._plan, layout.Fast) else query_length
        return kv, self.columns + query_length - kv

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity + 1

    # -- one step -----------------------------------------------------------------------------
    def _start(self, batch: int) -> None:
        if self.count is None:
            self.count = torch.zeros(batch, dtype=torch.long)
            self.frame = torch.zeros(batch, dtype=torch.long)
            self.slot_pos = torch.full((batch, self.sinks), -1, dtype=torch.long)
        elif batch != self.count.shape[0]:
            raise SinklessError(
                f"this SinkCache holds {self.count.shape[0]} stream(s) and was given a batch of {batch}",
                fix="use one SinkCache per batch (or cache.reset() to start over)",
            )

    def prepare(self, valid: torch.Tensor, device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict:
        """Lay out the next forward of ``valid.shape[1]`` tokens per row (``valid`` ``(B, n)``: False = padding), on
        ``device`` (the inputs') with float masks in ``dtype`` (the model's).

        Returns the model inputs the step needs: ``position_ids`` ``(B, n)`` and ``attention_mask`` (None when a
        plain causal mask over the slots is right, else a 4D mask or a dict of them per layer type)."""
        if self._plan is not None:  # an earlier forward failed half way: its layers' work is dropped
            self.abort()
        self._device, self._dtype = device or self._device, dtype or self._dtype
        self._start(valid.shape[0])
        fast = layout.plan_fast(self, valid) if valid.shape[1] == 1 else None
        self._plan = fast if fast is not None else layout.plan_general(self, valid)
        self._done = 0
        return {"position_ids": self._plan.position_ids.to(self._device), "attention_mask": self._plan.masks}

    def abort(self) -> None:
        """Forget a step that did not complete: the cache stays as it was before it."""
        self._plan, self._done = None, 0
        for layer in self.layers:
            layer.staged = None

    @property
    def pending(self) -> bool:
        return self._plan is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store a layer's new keys/values ``(B, h, n, d)``; return the keys/values it attends to ``(B, h, K, d)``."""
        plan = self._plan
        if plan is None:
            raise RuntimeError(
                "a SinkCache assigns the positions and mask of each step: call the model it was built with "
                "(model(..., past_key_values=cache) or model.generate), not one of its submodules"
            )
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        inv_freq = self.spec.inv_freq[layer_idx]
        if isinstance(plan, layout.Fast):
            keys, values = self._update_fast(layer, plan, inv_freq, key_states, value_states)
        else:
            keys, values = self._update_general(layer, plan, inv_freq, key_states, value_states)
        self._done += 1
        if self._done == len(self.layers):
            self._commit()
        return keys, values

    @staticmethod
    def _cos_sin(plan, inv_freq: torch.Tensor, shifts: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(inv_freq), id(shifts), device)  # layers of a model split over devices get their own copy
        if key not in plan.rotations:
            cos, sin = rotation(inv_freq, shifts)
            plan.rotations[key] = (cos.to(device), sin.to(device))
        return plan.rotations[key]

    def _update_fast(self, layer: SinkLayer, plan: layout.Fast, inv_freq, key_states, value_states):
        layer.ensure(plan.capacity, self.sinks)
        b, h, _, d = key_states.shape
        slot = plan.slot.to(key_states.device).view(b, 1, 1, 1)  # (B, 1, 1, 1) each row's free slot
        layer.keys.scatter_(2, slot.expand(b, h, 1, d), key_states)
        layer.values.scatter_(2, slot.expand(b, h, 1, value_states.shape[-1]), value_states)
        if self.sinks and not torch.equal(layer.slot_offset, plan.offset):  # re-rotate the sink slots
            layer.keys[:, :, : self.sinks] = self._rotated_sinks(plan, layer, inv_freq, key_states.device)
            layer.slot_offset = plan.offset
        return layer.keys[:, :, : plan.capacity], layer.values[:, :, : plan.capacity]

    def _rotated_sinks(self, plan: layout.Fast, layer: SinkLayer, inv_freq: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``layer``'s sinks rotated by each row's offset ``(B, h, S, d)``: one rotation of every layer's sinks per
        step when they are stacked (a one-token step is otherwise a handful of tiny ops per layer)."""
        if self._sink_stack is None:
            cos, sin = self._cos_sin(plan, inv_freq, plan.offset, device)  # (B, r)
            return shift_keys(layer.sink_keys, cos[:, None, None], sin[:, None, None])
        if plan.rotated is None:
            plan.rotated = {}
            for key, members in self._freq_groups.items():
                cos, sin = rotation(self.spec.inv_freq[members[0]], plan.offset)  # (B, r)
                cos, sin = cos.to(self._sink_stack.device)[None, :, None, None], sin.to(self._sink_stack.device)[None, :, None, None]
                stack = self._sink_stack if len(members) == len(self.layers) else self._sink_stack[members]
                plan.rotated[key] = (shift_keys(stack, cos, sin), {m: j for j, m in enumerate(members)})  # (L_g, B, h, S, d)
        rotated, where = plan.rotated[id(inv_freq)]
        return rotated[where[layer.index]]

    def _stack_sinks(self) -> None:
        sinks = [layer.sink_keys for layer in self.layers]
        same = all(k is not None and k.shape == sinks[0].shape and k.device == sinks[0].device and k.dtype == sinks[0].dtype for k in sinks)
        self._sink_stack = torch.stack(sinks) if same and sinks else None
        if self._sink_stack is not None:
            for i, layer in enumerate(self.layers):
                layer.sink_keys = self._sink_stack[i]

    def _update_general(self, layer: SinkLayer, plan: layout.General, inv_freq, key_states, value_states):
        layer.ensure(max(plan.capacity_before, self.sinks), self.sinks)
        keys, values = layer.keys[:, :, : plan.capacity_before], layer.values[:, :, : plan.capacity_before]
        s, dev = self.sinks, key_states.device
        # this step's sinks (unrotated): stored ones, or new tokens of this chunk
        sink_index = plan.sink_index.to(dev)  # (B, S) into [stored sinks | new]
        sink_k = _gather(torch.cat([layer.sink_keys, key_states], 2), sink_index)  # (B, h, S, d)
        sink_v = _gather(torch.cat([values[:, :, :s], value_states], 2), sink_index)
        blocks_k, blocks_v = [sink_k, keys, key_states], [sink_v, values, value_states]
        if plan.copy_shift is not None:  # per-query rotated copies of the sinks
            cos, sin = self._cos_sin(plan, inv_freq, plan.copy_shift, dev)  # (B, G, r)
            b, h, _, d = sink_k.shape
            g = plan.copy_shift.shape[1]
            copies = shift_keys(sink_k[:, :, None], cos[:, None, :, None], sin[:, None, :, None])  # (B, h, G, S, d)
            blocks_k.insert(0, copies.reshape(b, h, g * s, d))
            blocks_v.insert(0, sink_v[:, :, None].expand(b, h, g, s, sink_v.shape[-1]).reshape(b, h, g * s, -1))
        out_k, out_v = torch.cat(blocks_k, 2), torch.cat(blocks_v, 2)  # (B, h, K, d)
        # the slots after this step: [sinks | kept window], gathered from [sinks | slots | new]
        keep = plan.keep_index.to(dev)  # (B, C')
        layer.staged = (_gather(torch.cat([sink_k, keys, key_states], 2), keep),
                        _gather(torch.cat([sink_v, values, value_states], 2), keep), sink_k)
        return out_k, out_v

    def _commit(self) -> None:
        plan, self._plan, self._done = self._plan, None, 0
        if isinstance(plan, layout.General):
            for layer in self.layers:
                layer.keys, layer.values, layer.sink_keys = layer.staged
                layer.slot_offset = torch.zeros_like(plan.count_after)
                layer.staged = None
            self._stack_sinks()
        self.count, self.slot_pos, self.columns = plan.count_after, plan.slot_pos_after, self.columns + plan.n
        self._rebase()

    def _rebase(self) -> None:
        """Rotate the window back for rows whose frame positions passed ``2 (S + W)``."""
        lead = self.count - self.frame
        if int(lead.max()) <= 2 * self.capacity:
            return
        rows = lead > 2 * self.capacity
        new_frame = torch.where(rows, self.count - self.count.clamp(max=self.capacity), self.frame)
        shift = self.frame - new_frame  # (B,) 0 for rows that stay
        done = {}
        for i, layer in enumerate(self.layers):
            if not layer.is_initialized:
                continue
            inv, device = self.spec.inv_freq[i], layer.keys.device
            if (id(inv), device) not in done:
                cos, sin = rotation(inv, shift)
                done[id(inv), device] = (cos.to(device)[:, None, None], sin.to(device)[:, None, None])
            cos, sin = done[id(inv), device]
            layer.keys = torch.cat([layer.keys[:, :, : self.sinks], shift_keys(layer.keys[:, :, self.sinks :], cos, sin)], 2)
        self.frame = new_frame
        self.rebases += 1

    # -- the rest of the Cache API ------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a SinkCache cannot be rolled back: evicted tokens are gone")

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.count is None:
            return
        index = index.long()
        cpu = index.cpu()
        self.count, self.frame, self.slot_pos = self.count[cpu], self.frame[cpu], self.slot_pos[cpu]
        if self.last_logits is not None:
            self.last_logits = self.last_logits.index_select(0, index.to(self.last_logits.device))
        for layer in self.layers:
            layer.select_rows(index)
        self._stack_sinks()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.count is not None:
            self._select_rows(torch.arange(self.count.shape[0]).repeat_interleave(repeats))


def _gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source`` ``(B, h, N, d)`` at per-row positions ``index`` ``(B, M)`` -> ``(B, h, M, d)``."""
    b, h, _, d = source.shape
    return source.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))
