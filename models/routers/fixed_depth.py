"""Control: every token runs exactly k recursions (``params.depth``, default 2 of N_r = 3; capped
at N_r).

No token is routed: recursions 1..k take every token and later ones none, in training and inference
alike (causal). The gate alpha * sigmoid(score) is still learned per token, so this control differs
from ``expert_choice`` only in which tokens run each recursion. With k = 2 and N_r = 3 it spends the
same mean number of recursions per token as expert-choice's 1, 2/3, 1/3 schedule.

The rule is kept in the ``threshold`` buffer (-inf: everyone continues, +inf: nobody does), the form
the decode engine of ``harness.engine`` reads, so cached decoding and the engine agree with forward().
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError
from .base import Selection, compact, register_router
from .expert_choice import ExpertChoiceRouter


@register_router("fixed_depth")
class FixedDepthRouter(ExpertChoiceRouter):
    allowed_aux = ("none",)

    def __init__(self, cfg, d_model, num_recursions):
        super().__init__(cfg, d_model, num_recursions)
        params = self.read_params("depth")
        if cfg.capacity is not None:
            raise ConfigError("model.router.capacity must be null for fixed_depth (set params.depth)")
        k = params.get("depth", 2)
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"model.router.params.depth={k!r} must be an integer >= 1")
        k = min(k, num_recursions)  # capped: every token runs all recursions
        self._depth = k  # for a model on the meta device (mor-plan), whose buffers hold no values
        inf = float("inf")
        self.threshold.copy_(torch.tensor([-inf if r < k else inf for r in range(num_recursions)]))

    @property
    def depth(self) -> int:
        if self.threshold.is_meta:
            return self._depth
        return int(torch.isneginf(self.threshold).sum())

    def capacities(self) -> list[float]:
        return [1.0 if r < self.depth else 0.0 for r in range(self.n_rec)]

    def active_rule(self) -> str:
        return "threshold"  # the same rule in training and inference

    def select(self, r: int, h: Tensor, prev: Tensor, plan, aux: dict, stats: dict) -> Selection:
        logits = self.score(h, r)
        active = prev & (logits.detach() > self.threshold[r])
        stats[f"router/load_r{r}"] = active.float().mean().detach()
        if r == self.n_rec - 1:
            stats["router/dead_token_ratio"] = (~active.any(0)).float().mean().detach()
        idx, valid = compact(active)
        return Selection(idx=idx, valid=valid, active=active, gate=self.gate(torch.gather(logits, 1, idx)))

    @torch.no_grad()
    def calibrate(self, run_batches) -> dict[str, float]:
        return {}  # the thresholds are the rule, not fitted
