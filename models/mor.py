"""Mixture-of-Recursions: a shared block applied up to N_r times, a router choosing per token.

Layout is the recursive model's (Middle-Cycle: unique first layer, shared block x N_r, unique last
layer). At recursion r the router returns the active tokens; they are gathered in causal order,
run through the shared block attending only among themselves at their original RoPE positions
(recursion-wise caching; or over the first recursion's K/V under `kv=share`), and scattered back.

Expert-choice update (paper eq. 2.1): h <- h + g_r * f(h) on the selected tokens.
Token-choice update (official code): s <- f(s) while active; output h_1 + g * s at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ConfigError, ModelConfig
from .kv_cache import KVCache, SharedKV
from .recursive import slot_recursions
from .routers.base import get_router_class
from .routers.expert_choice import CAUSAL_RULES
from .transformer import TransformerLM


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _scatter(x: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), src)


class MoRLM(TransformerLM):
    def __init__(self, cfg: ModelConfig):
        router_cls = get_router_class(cfg.router.name)  # fail on a bad name before allocating
        super().__init__(cfg)
        self.router = router_cls(cfg.router, cfg.d_model, cfg.num_recursions)
        self.router.apply(self._init_router)
        self.router.bind(self)
        rec = slot_recursions(cfg)
        self.slots_pre = [s for s, r in enumerate(rec) if r < 0 and s < rec.index(0)]
        self.slots_rec = [[s for s, x in enumerate(rec) if x == r] for r in range(cfg.num_recursions)]
        self.slots_post = [s for s, r in enumerate(rec) if r < 0 and s > rec.index(0)]

    def _init_router(self, m) -> None:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=self.cfg.init_std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)

    def group_of_slot(self, rec: list[int]) -> list[int]:
        return [0 if r < 0 else r + 1 for r in rec]

    @property
    def routing_rule(self) -> str:
        """The rule used outside training; 'topk' is the paper's non-causal one."""
        return self.router.cfg.inference if self.router.kind == "expert" else "token_choice"

    @property
    def causal(self) -> bool:
        return self.router.kind == "token" or self.router.active_rule() in CAUSAL_RULES

    def trunk(self, x: Tensor, pos: Tensor, cache: KVCache | None, aux: dict, stats: dict) -> Tensor:
        if cache is not None and not self.causal:
            raise ConfigError(
                "model.router.inference=topk is non-causal and cannot decode with a KV cache; "
                f"use one of {', '.join(CAUSAL_RULES)}"
            )
        ctx = cache if cache is not None else SharedKV(self.plan) if self.cfg.kv == "share" else None
        if cache is not None:
            cache.begin(0, pos)
        x = self.run_slots(x, pos, self.slots_pre, ctx, 0)
        h1 = x
        plan = self.router.plan(h1, aux, stats)
        expert = self.router.kind == "expert"
        active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        for r, slots in enumerate(self.slots_rec):
            sel = self.router.select(r, x, active, plan, aux, stats)
            active = sel.active
            if sel.idx.shape[1] == 0:  # nobody continues (variable-count rules only)
                if cache is not None:
                    cache.begin(r + 1, pos[:, :0], active[:, :0])
                break
            xs, ps = _gather(x, sel.idx), torch.gather(pos, 1, sel.idx)
            if cache is not None:
                cache.begin(r + 1, ps, sel.valid)
            ys = self.run_slots(xs, ps, slots, ctx, r + 1, sel.valid)
            new = xs + sel.gate.unsqueeze(-1).to(ys.dtype) * ys if expert else ys
            if sel.valid is not None:
                new = torch.where(sel.valid.unsqueeze(-1), new, xs)
            x = _scatter(x, sel.idx, new)
        if not expert:
            _, gate = plan
            x = h1 + gate.unsqueeze(-1).to(x.dtype) * x
        return self.run_slots(x, pos, self.slots_post, ctx, 0)

    def depth_fractions(self) -> list[float]:
        return self.router.capacities()

    def extra_flops_per_token(self) -> float:
        return self.router.flops_per_token()

    def set_step(self, step: int) -> None:
        self.router.step = step

    @torch.no_grad()
    def calibrate(self, batches) -> dict[str, float]:
        """Fit expert-choice causal thresholds on held-out batches of input ids (no-op for token-choice)."""
        if self.router.kind != "expert":
            return {}
        was = self.training
        self.eval()

        def run():
            for ids in batches:
                self(ids)

        try:
            return self.router.calibrate(run)
        finally:
            self.train(was)
