"""One step of a sink + window cache laid out (Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks"): each query's position, what it may see, and which tokens stay afterwards.

Token ``t`` of a stream (its ``t``-th real token) attends to the sinks ``0..S-1``, the window
``max(S, t - W)..t-1`` and itself, at in-cache positions: the sinks at ``0..S-1`` and itself at
``min(t, S + W)``. Window keys are stored in the row's frame (rotary position ``u - frame``) and queries get
``t - frame``, so window distances are text distances; a sink must sit at distance ``min(t, S + W) - i``,
i.e. rotated by ``offset = (t - frame) - min(t, S + W)``. A one-token step rotates the sink slots by the
row's offset (``Fast``); a longer step gives every query whose offset is not 0 its own rotated copy of the
sinks (``General``). Sliding-window layers also drop keys at in-cache distance ``>= sliding_window``.

Columns of a ``General`` step, in the order ``SinkCache.update`` returns them:
``[sink copies (G S) | sinks (S) | slots (C) | new tokens (n)]``; the slots' sink entries are hidden there
(the unrotated sinks block replaces them). Everything here works on small CPU index tensors.

Legend: B rows, n new tokens, C slots, G sink copies, S sinks, W window, K keys attended.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Fast", "General", "groups", "plan_fast", "plan_general", "format_masks"]

_FAR = torch.iinfo(torch.long).max // 4


@dataclasses.dataclass
class Fast:
    """A one-token step with every row's sinks complete: written in place into a free slot."""

    position_ids: torch.Tensor  # (B, 1)
    masks: torch.Tensor | dict | None
    slot: torch.Tensor  # (B,) where each row's new token goes
    offset: torch.Tensor  # (B,) rotation of the sinks for this step
    capacity: int  # slots attended (the buffer may be larger)
    count_after: torch.Tensor  # (B,)
    slot_pos_after: torch.Tensor  # (B, C) after eviction
    n: int = 1
    rotations: dict = dataclasses.field(default_factory=dict)
    rotated: dict | None = None  # the step's rotated sinks of every layer, per rotary-frequency group


@dataclasses.dataclass
class General:
    """Any step: a per-query band in a 4D mask, rebuilt slots afterwards."""

    n: int
    position_ids: torch.Tensor  # (B, n)
    masks: torch.Tensor | dict
    sink_index: torch.Tensor  # (B, S) into [stored sinks | new tokens]
    copy_shift: torch.Tensor | None  # (B, G) rotation of each sink copy
    keep_index: torch.Tensor  # (B, C') into [sinks | slots | new tokens]
    capacity_before: int
    count_after: torch.Tensor  # (B,)
    slot_pos_after: torch.Tensor  # (B, C')
    rotations: dict = dataclasses.field(default_factory=dict)


def groups(cache) -> dict[int | None, list[str]]:
    """Effective sliding window -> layer types using it (None: no restriction within the kept tokens)."""
    groups: dict[int | None, list[str]] = {}
    for kind, window in zip(cache.spec.layer_types, cache.spec.sliding):
        effective = window if window is not None and window <= cache.capacity else None
        if kind not in groups.setdefault(effective, []):
            groups[effective].append(kind)
    return groups


def format_masks(cache, visible_by_group: dict[int | None, torch.Tensor]) -> torch.Tensor | dict:
    """4D masks ``(B, 1, n, K)`` in the format of the model's attention, one per layer type when they differ."""
    out = {}
    for window, visible in visible_by_group.items():
        mask = visible[:, None].to(cache._device)
        if cache.spec.attn_impl == "eager":  # an additive float mask; sdpa takes the boolean one
            mask = torch.zeros(mask.shape, dtype=cache._dtype, device=cache._device).masked_fill(~mask, torch.finfo(cache._dtype).min)
        out[window] = mask
    if len(out) == 1:
        return next(iter(out.values()))
    return {kind: out[window] for window, kinds in cache.mask_groups.items() for kind in kinds}


def _visible(cache, build) -> dict[int | None, torch.Tensor]:
    """``build(window)`` -> visibility for each sliding group of the model."""
    return {window: build(window) for window in cache.mask_groups}


def _within(distance: torch.Tensor, window: int | None) -> torch.Tensor:
    return torch.ones_like(distance, dtype=torch.bool) if window is None else distance < window


def plan_fast(cache, valid: torch.Tensor) -> Fast | None:
    """The in-place plan for a one-token step, or None when the step needs the general layout."""
    s, w = cache.sinks, cache.window
    count, frame, slot_pos = cache.count, cache.frame, cache.slot_pos
    if not bool(valid.all()) or (s and bool((count < s).any())):
        return None
    b, c = slot_pos.shape
    free = slot_pos[:, s:] < 0  # (B, C - S)
    if not bool(free.any(1).all()):  # grow the window slots (doubling, at most S + W + 1 in all)
        grow = min(s + w + 1, s + max(2 * (c - s), 8)) - c
        slot_pos = torch.cat([slot_pos, slot_pos.new_full((b, grow), -1)], 1)
        free = slot_pos[:, s:] < 0
        c = slot_pos.shape[1]
    slot = s + free.int().argmax(1)  # (B,) first free window slot
    t = count  # (B,) text position of each row's new token
    cpos = t.clamp(max=s + w)
    offset = (t - frame) - cpos
    after = slot_pos.clone()
    after[torch.arange(b), slot] = t
    occupied = after >= 0  # (B, C): every kept token is visible to the new one
    if list(cache.mask_groups) == [None]:  # no sliding window narrower than the cache
        visible, plain = {None: occupied[:, None, :]}, bool(occupied.all())
    else:
        distance = torch.where(after < s, cpos[:, None] - after, t[:, None] - after)  # (B, C) in-cache distances
        visible = _visible(cache, lambda window: (occupied & _within(distance, window))[:, None, :])  # (B, 1, C)
        plain = False
    count_after = count + 1
    evict = (after >= s) & (after < (count_after - w)[:, None])
    return Fast(
        position_ids=(t - frame)[:, None],
        masks=None if plain else format_masks(cache, visible),
        slot=slot, offset=offset, capacity=c, count_after=count_after,
        slot_pos_after=after.masked_fill(evict, -1),
    )


def plan_general(cache, valid: torch.Tensor) -> General:
    s, w = cache.sinks, cache.window
    count, frame, slot_pos = cache.count, cache.frame, cache.slot_pos
    b, n = valid.shape
    c = slot_pos.shape[1]
    cum = valid.long().cumsum(1)  # (B, n)
    t = (count[:, None] + cum - 1).clamp(min=0)  # (B, n) text positions (a pad takes its predecessor's)
    cpos = t.clamp(max=s + w)
    pos = t - frame[:, None]  # (B, n) rotary positions
    offset = torch.where(valid, pos - cpos, 0)  # (B, n)
    need = valid & (offset != 0) if s else torch.zeros_like(valid)
    cols = need.any(0).nonzero().flatten()  # (G,) queries that get a copy of the sinks
    i = torch.arange(s)  # sink index
    q = torch.arange(n)
    u_slot = slot_pos[:, None, :]  # (B, 1, C)
    u_new = torch.where(valid, t, -1)[:, None, :]  # (B, 1, n) text positions of the new tokens as keys
    tq = t[:, :, None]  # (B, n, 1)
    band_slot = (u_slot >= s) & (u_slot >= tq - w) & (u_slot <= tq)
    band_new = (u_new >= s) & (u_new >= tq - w) & (u_new <= tq) & valid[:, :, None]
    own = ~valid[:, :, None] & (q[:, None] == q[None, :])  # a pad sees itself only (its output is replaced)

    def build(window):
        vq = valid[:, :, None]
        sinks = vq & (offset[:, :, None] == 0) & (i <= tq) & _within(cpos[:, :, None] - i, window)  # (B, n, S)
        slots = vq & band_slot & _within(tq - u_slot, window)  # (B, n, C)
        new = (band_new & _within(tq - u_new, window)) | own  # (B, n, n)
        blocks = [sinks, slots, new]
        if len(cols):
            mine = (q[:, None] == cols[None, :])[None, :, :, None] & need[:, :, None, None]  # (B, n, G, 1)
            copies = mine & _within(cpos[:, :, None, None] - i, window)  # (B, n, G, S)
            blocks.insert(0, copies.reshape(b, n, len(cols) * s))
        return torch.cat(blocks, 2)  # (B, n, K)

    masks = format_masks(cache, _visible(cache, build))
    # this step's sinks: stored (i < count) or the new token at text position i
    at = valid[:, None, :] & (t[:, None, :] == i[None, :, None])  # (B, S, n)
    sink_index = torch.where(i[None] < count[:, None], i[None], s + at.int().argmax(2))  # (B, S)
    # what stays: the sinks, then the window for the next token, in text order
    count_after = count + valid.sum(1)
    keep_from = (count_after - w).clamp(min=s)  # (B,)
    candidates = torch.cat([slot_pos.masked_fill(slot_pos < s, -1), torch.where(valid, t, -1)], 1)  # (B, C + n)
    keep = (candidates >= keep_from[:, None]) & (candidates >= 0)
    kept = int(keep.sum(1).max()) if b else 0
    order = torch.where(keep, candidates, _FAR).argsort(dim=1, stable=True)[:, :kept]  # (B, M)
    window_pos = candidates.gather(1, order).masked_fill(~keep.gather(1, order), -1)  # (B, M)
    spare = min(s + w + 1, s + kept + 1) - (s + kept)  # one free slot for the next token
    keep_index = torch.cat([i.expand(b, s), s + order, order.new_zeros(b, spare)], 1)  # (B, C')
    sink_pos = torch.where(i[None] < count_after[:, None], i[None], -1)
    slot_pos_after = torch.cat([sink_pos, window_pos, window_pos.new_full((b, spare), -1)], 1)
    return General(
        n=n, position_ids=pos, masks=masks, sink_index=sink_index,
        copy_shift=offset[:, cols] if len(cols) else None,
        keep_index=keep_index, capacity_before=c, count_after=count_after, slot_pos_after=slot_pos_after,
    )
