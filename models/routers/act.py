"""Causal learned halting (Adaptive Computation Time, Graves 2016) over the recursion block.

Every token runs recursion 1. Before each later recursion r (r = 1 .. N_r-1, 0-based) a halting unit
reads the token's own hidden state, p_r = sigmoid(w_r . h_r / temperature), and the halting mass
accumulates, H_r = p_1 + ... + p_r. The token runs recursion r while H_r < 1 - eps (``params.eps``,
default 0.01) and stops for good at the first r where it is not (hierarchical). A token's decision
depends only on its own hidden state, so the rule is causal in training and inference alike: there
is no top-k, no capacity and no calibration.

Update: recursion r scales its block output by the halting mass still unspent,
h <- h + alpha * (1 - H_r) * f(h) (H_0 = 0). With the residual update this makes the output ACT's
expectation over halting steps: the remainder R = 1 - H_{N-1} weighs the last step, and gradients
of the LM loss reach the halting units through the gates.

Loss (``aux_loss: ponder``): the ponder cost N + R per token, averaged over tokens and weighted by
``aux_coeff`` (N = recursions run, constant for the gradient; R pushes towards halting earlier).

FLOPs budgets use the nominal schedule (N_r - r) / N_r, the same mean depth as expert-choice; the
depth really spent is logged as ``router/load_r*`` and ``flops_per_token_measured``.

Decoding: the model's own cached decode follows this rule exactly; the depth-wise batching engine
of ``harness.engine`` scores each recursion with ``score`` and ``threshold`` alone and cannot
accumulate H, so its decode throughput for this router is an approximation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .base import Selection, compact, register_router
from .expert_choice import ExpertChoiceRouter


@register_router("act")
class HaltingRouter(ExpertChoiceRouter):
    engine_exact = False  # see "Decoding" above
    allowed_aux = ("ponder", "none")
    allowed_func = ("sigmoid",)

    def __init__(self, cfg, d_model, num_recursions):
        super().__init__(cfg, d_model, num_recursions)
        if cfg.inference != "threshold":
            raise ConfigError(
                f"model.router.inference={cfg.inference!r} is invalid for act: halting is causal by "
                "construction; allowed threshold"
            )
        params = self.read_params("eps")
        self.eps = float(params.get("eps", 0.01))
        if not 0 < self.eps < 1:
            raise ConfigError(f"model.router.params.eps={self.eps} must lie in (0, 1)")
        self.scorers[0] = nn.Identity()  # no halting decision before the first recursion: no weights

    def score(self, h: Tensor, r: int) -> Tensor:
        if r == 0:  # no halting unit before the first recursion (callers outside select())
            return torch.zeros(h.shape[:2], device=h.device, dtype=h.dtype)
        return super().score(h, r)

    def active_rule(self) -> str:
        return "threshold"  # the halting rule is the same (causal) in training and inference

    def plan(self, h1: Tensor, aux: dict, stats: dict) -> dict:
        return {"H": torch.zeros(h1.shape[:2], device=h1.device, dtype=torch.float32)}

    def select(self, r: int, h: Tensor, prev: Tensor, plan, aux: dict, stats: dict) -> Selection:
        H_prev = plan["H"]
        if r == 0:
            H, active = H_prev, prev
        else:
            p = torch.sigmoid(self.score(h, r).float() / self.cfg.temperature)
            H = H_prev + p * prev  # halted tokens stop accumulating
            active = prev & (H < 1 - self.eps)
            if self.training:
                halted = prev & ~active  # ran recursions 0..r-1: N = r, remainder 1 - H_{r-1}
                self._ponder(aux, halted, r, 1 - H_prev)
            stats[f"router/halt_prob_r{r}"] = (p * prev).sum().detach() / prev.sum().clamp_min(1)
        plan["H"] = H
        last = r == self.n_rec - 1
        if self.training and last:  # ran every recursion: N = N_r, remainder 1 - H_{N_r-1}
            self._ponder(aux, active, self.n_rec, 1 - H)
        stats[f"router/load_r{r}"] = active.float().mean().detach()
        if last:
            stats["router/dead_token_ratio"] = (~active.any(0)).float().mean().detach()
        idx, valid = compact(active)
        gate = self.cfg.alpha * torch.gather(1 - H, 1, idx)
        return Selection(idx=idx, valid=valid, active=active, gate=gate)

    def _ponder(self, aux: dict, mask: Tensor, n: int, remainder: Tensor) -> None:
        if self.cfg.aux_loss != "ponder":
            return
        cost = ((n + remainder) * mask).sum() / mask.numel()
        aux["act_ponder"] = aux.get("act_ponder", 0) + self.cfg.aux_coeff * cost

    @torch.no_grad()
    def calibrate(self, run_batches) -> dict[str, float]:
        return {}  # nothing to fit: the halting threshold is 1 - eps
