"""Static-size KV caches for every family.

One *slot* per attention application (effective layer). Slots are grouped by the set of tokens
they see: vanilla and recursive models have one group (every token visits every layer); MoR has
group 0 for the unique first/last layers and one group per recursion, which holds only the tokens
active at that recursion (recursion-wise caching). Under recursive KV sharing, the slots of later
recursions own no storage and read the first recursion's buffers instead.

Buffers are allocated once (`max_len` per sequence plus one scratch column that absorbs writes of
padding rows), so decoding never reallocates. Each group stores the absolute position of every
cached key, so causality is a position comparison, valid for compacted (routed) token sets too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

_FAR = torch.iinfo(torch.int32).max


@dataclass
class SlotPlan:
    """Static description of the attention slots of a model (see module docstring)."""

    group: list[int]  # group of each slot
    source: list[int]  # slot whose K/V buffers this slot reads (itself unless KV-shared)

    @property
    def n_groups(self) -> int:
        return max(self.group) + 1


class _Hook:
    __slots__ = ("fn", "project")

    def __init__(self, fn, project: bool):
        self.fn, self.project = fn, project

    def __call__(self, k, v):
        return self.fn(k, v)


class KVCache:
    def __init__(self, plan: SlotPlan, batch: int, max_len: int, n_kv: int, head_dim: int, dtype, device):
        self.plan, self.batch, self.max_len = plan, batch, max_len
        shape = (batch, n_kv, max_len + 1, head_dim)
        own = [s for s, src in enumerate(plan.source) if src == s]
        self.k = {s: torch.zeros(shape, dtype=dtype, device=device) for s in own}
        self.v = {s: torch.zeros(shape, dtype=dtype, device=device) for s in own}
        G = plan.n_groups
        self.pos = torch.full((G, batch, max_len + 1), _FAR, dtype=torch.long, device=device)
        self.length = torch.zeros(G, batch, dtype=torch.long, device=device)
        self.fed = [0] * G  # host-side upper bound of each group's length: slices without a sync
        self.seen = 0  # tokens fed per sequence so far (host side)
        self._cur: dict[int, tuple[Tensor, Tensor]] = {}  # group -> (write index, query positions)

    # -- bookkeeping ------------------------------------------------------------------------
    def begin(self, g: int, qpos: Tensor, valid: Tensor | None = None) -> None:
        """Register the next queries of group g: positions [B, q], valid rows mask [B, q]."""
        B, q = qpos.shape
        idx = self.length[g][:, None] + torch.arange(q, device=qpos.device)
        n_new = torch.full((B,), q, device=qpos.device) if valid is None else valid.sum(1)
        if valid is not None:
            idx = torch.where(valid, idx, self.max_len)
        idx = idx.clamp_max(self.max_len)
        self.pos[g].scatter_(1, idx, qpos)
        self.pos[g][:, self.max_len] = _FAR
        self.length[g] += n_new
        self.fed[g] = min(self.max_len, self.fed[g] + q)
        self._cur[g] = (idx, qpos)

    def _mask(self, g_keys: int, qpos: Tensor) -> Tensor:
        S = self.fed[g_keys]
        kpos = self.pos[g_keys, :, :S]
        return (kpos[:, None, :] <= qpos[:, :, None]).unsqueeze(1)  # [B, 1, q, S]

    def hook(self, slot: int, g: int) -> _Hook:
        """Attention hook for `slot`, whose queries were registered with `begin(g, ...)`."""
        src = self.plan.source[slot]
        idx, qpos = self._cur[g]
        g_keys = self.plan.group[src]
        S = self.fed[g_keys]

        def attend(k: Tensor | None, v: Tensor | None):
            kb, vb = self.k[src], self.v[src]
            if k is not None:  # owner: write the new keys at this group's write index
                w = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
                kb.scatter_(2, w, k.to(kb.dtype))
                vb.scatter_(2, w, v.to(vb.dtype))
            return kb[:, :, :S], vb[:, :, :S], self._mask(g_keys, qpos)

        return _Hook(attend, project=src == slot)

    # -- batch surgery (shared-prefix scoring, batched prompts of unequal length) --------------
    def select(self, rows: Tensor) -> KVCache:
        """A new cache whose row j is a copy of row `rows[j]` (e.g. one prompt -> its n continuations)."""
        new = copy.copy(self)
        new.k = {s: t.index_select(0, rows) for s, t in self.k.items()}
        new.v = {s: t.index_select(0, rows) for s, t in self.v.items()}
        new.pos = self.pos.index_select(1, rows)
        new.length = self.length.index_select(1, rows)
        new.fed, new.batch, new._cur = list(self.fed), int(rows.numel()), {}
        return new

    def forget_from(self, lengths: Tensor) -> None:
        """Hide keys at positions >= lengths[b] in row b (the right padding of a batched prefill).

        The hidden entries keep their slots; later tokens are written after them, at any positions."""
        self.pos.masked_fill_(self.pos >= lengths.to(self.pos.device).view(1, -1, 1), _FAR)

    # -- measurement -------------------------------------------------------------------------
    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def bytes_used(self) -> Tensor:
        """KV bytes actually holding tokens, per sequence [B] (tensor; no host sync)."""
        per_tok = {s: 2 * t.shape[1] * t.shape[3] * t.element_size() for s, t in self.k.items()}
        total = torch.zeros(self.batch, dtype=torch.long, device=self.length.device)
        for s, b in per_tok.items():
            total += self.length[self.plan.group[s]] * b
        return total


class SharedKV:
    """Training-time (no cache) recursive KV sharing: recursion 1 records K/V, later ones reuse it."""

    def __init__(self, plan: SlotPlan):
        self.plan = plan
        self.store: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def hook(self, slot: int, qpos: Tensor, valid: Tensor | None = None) -> _Hook | None:
        src = self.plan.source[slot]
        if src == slot:
            if not any(s == slot for i, s in enumerate(self.plan.source) if i != slot):
                return None  # nobody reads this slot: plain causal attention

            def record(k, v):
                kpos = qpos if valid is None else qpos.masked_fill(~valid, _FAR)  # padding rows unseen
                self.store[slot] = (k, v, kpos)
                return k, v, (kpos[:, None, :] <= qpos[:, :, None]).unsqueeze(1)

            return _Hook(record, project=True)

        def reuse(_k, _v):
            k, v, kpos = self.store[src]
            return k, v, (kpos[:, None, :] <= qpos[:, :, None]).unsqueeze(1)

        return _Hook(reuse, project=False)
