"""Mixture-of-Depths-style routing (Raposo et al. 2024) over the recursion block.

In MoD every routed block independently picks the top-k tokens of the sequence (a fixed capacity c,
k = floor(c * T)); the other tokens bypass it through the residual stream. There is no hierarchy
between blocks. Here the routed "blocks" are the N_r applications of the shared recursion block:

* recursion r selects its own top-k among ALL tokens, not only among those selected at r-1 (no
  hierarchical filtering), so a token may skip recursion 1 and still run recursion 2;
* every recursion has the same capacity c (``params.capacity``, default 2/3: the same mean number
  of recursions per token as expert-choice's 1, 2/3, 1/3 schedule with N_r = 3), or the per-recursion
  list ``model.router.capacity`` when given;
* the update, gate (alpha * sigmoid), BCE auxiliary loss and the causal inference rule (per-recursion
  thresholds calibrated to the training capacity) are expert-choice's, so the only difference from
  ``expert_choice`` is the missing hierarchy and the flat capacity.

Decoding: the model's own cached decode (``model.generate`` / a KV cache) follows this rule exactly.
The depth-wise batching engine of ``harness.engine`` assumes hierarchical exits, so its decode
throughput for this router is an approximation (a token stops at its first skipped recursion).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError
from .base import Selection, register_router
from .expert_choice import ExpertChoiceRouter

DEFAULT_CAPACITY = 2 / 3


@register_router("mod")
class MixtureOfDepthsRouter(ExpertChoiceRouter):
    engine_exact = False  # see "Decoding" above

    def __init__(self, cfg, d_model, num_recursions):
        super().__init__(cfg, d_model, num_recursions)
        params = self.read_params("capacity")
        if "capacity" in params:
            if cfg.capacity is not None:
                raise ConfigError(
                    "model.router.params.capacity and model.router.capacity are both set for mod; give one"
                )
            c = float(params["capacity"])
            if not 0 < c <= 1:
                raise ConfigError(f"model.router.params.capacity={c} must lie in (0, 1]")
            self.target_caps = [c] * num_recursions
        elif cfg.capacity is None:
            self.target_caps = [DEFAULT_CAPACITY] * num_recursions
        # thresholds start at logit 0 (sigmoid 0.5) wherever the capacity is below 1
        self.threshold.copy_(torch.tensor([float("-inf") if c >= 1 else 0.0 for c in self.target_caps]))

    def select(self, r: int, h: Tensor, prev: Tensor, plan, aux: dict, stats: dict) -> Selection:
        # no hierarchical filtering: every token is a candidate at every recursion
        sel = super().select(r, h, torch.ones_like(prev), plan, aux, stats)
        if sel.idx.shape[1] == 0:
            # The model stops recursing once a recursion selects nobody (right for hierarchical
            # routers). Here a later recursion may still select tokens: hand back one padding row.
            B = prev.shape[0]
            zeros = torch.zeros(B, 1, dtype=torch.long, device=prev.device)
            return Selection(
                idx=zeros,
                valid=torch.zeros(B, 1, dtype=torch.bool, device=prev.device),
                active=sel.active,
                gate=torch.zeros(B, 1, dtype=h.dtype, device=h.device),
            )
        return sel
