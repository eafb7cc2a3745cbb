"""Expert-choice routing (paper eq. 2.1): each recursion picks its top-k tokens among the survivors.

Rules, by mode:
* training: ``topk`` over the whole sequence with capacity k_r = max(1, floor(c_r * T)); this is
  the paper's rule and it is NOT causal (a token's selection depends on later tokens).
* inference (``model.router.inference``): ``threshold`` (causal: score above a per-recursion
  threshold calibrated to the training capacity, default logit 0 = sigmoid 0.5), ``aux_router``
  (causal: a separate router trained with BCE on detached inputs), or ``topk`` (non-causal, kept
  for comparison and labelled so by the harness).
Hierarchical filtering: only tokens selected at recursion r compete at r+1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from .base import Router, Selection, compact, make_scorer, register_router

INFERENCE_RULES = ("topk", "threshold", "aux_router")
CAUSAL_RULES = ("threshold", "aux_router")


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    kind = "expert"
    allowed_aux = ("bce", "aux_router", "none")
    allowed_func = ("sigmoid", "tanh")

    def __init__(self, cfg, d_model, num_recursions):
        super().__init__(cfg, d_model, num_recursions)
        caps = list(cfg.capacity) if cfg.capacity is not None else super().capacities()
        if len(caps) != num_recursions:
            raise ConfigError(
                f"model.router.capacity has {len(caps)} entries; needs one per recursion "
                f"(model.num_recursions={num_recursions})"
            )
        if any(not 0 < c <= 1 for c in caps) or any(a < b for a, b in zip(caps, caps[1:])):
            raise ConfigError(f"model.router.capacity={caps} must be non-increasing and within (0, 1]")
        if cfg.capacity_factor is not None:
            raise ConfigError(
                "model.router.capacity_factor is a token-choice knob; expert-choice sets "
                "model.router.capacity (set it to null)"
            )
        if cfg.inference not in INFERENCE_RULES:
            raise ConfigError(
                f"model.router.inference={cfg.inference!r} is invalid: allowed {', '.join(INFERENCE_RULES)}"
            )
        if cfg.inference == "aux_router" and cfg.aux_loss != "aux_router":
            raise ConfigError("model.router.inference=aux_router needs model.router.aux_loss=aux_router")
        self.target_caps = caps
        self.scorers = nn.ModuleList(make_scorer(cfg.arch, d_model, 1) for _ in range(num_recursions))
        if cfg.aux_loss == "aux_router":
            self.aux_scorers = nn.ModuleList(make_scorer(cfg.arch, d_model, 1) for _ in range(num_recursions))
        # causal threshold per recursion, in logit space; `calibrate()` fits it to the capacity
        # (capacity-1 recursions take every candidate: -inf)
        thr = torch.tensor([float("-inf") if c >= 1 else 0.0 for c in caps])
        self.register_buffer("threshold", thr)
        self.rule: str | None = None  # overrides train/eval rule when set (calibration, probes)
        self.record: list | None = None  # calibration collects (r, candidate logits, top-k targets)

    def score(self, h: Tensor, r: int) -> Tensor:
        return self.scorers[r](h).squeeze(-1)

    def capacities(self) -> list[float]:
        w = self.cfg.capacity_warmup_steps
        if w <= 0 or self.step >= w:
            return self.target_caps
        frac = 0.5 * (1 + math.cos(math.pi * self.step / w))  # 1 -> 0 over the warm-up
        return [c + (1 - c) * frac for c in self.target_caps]

    def gate(self, logits: Tensor) -> Tensor:
        t = self.cfg.temperature
        z = logits if t == 1 else logits / t  # the same values, one op fewer (decode runs it per pass)
        f = torch.sigmoid(z) if self.cfg.func == "sigmoid" else torch.tanh(z)
        return self.cfg.alpha * f

    def active_rule(self) -> str:
        return self.rule or ("topk" if self.training else self.cfg.inference)

    def plan(self, h1: Tensor, aux: dict, stats: dict) -> None:
        return None

    def select(self, r: int, h: Tensor, prev: Tensor, plan, aux: dict, stats: dict) -> Selection:
        logits = self.score(h, r)  # [B, T]
        rule = self.active_rule()
        T = h.shape[1]
        topk_active = None
        if rule == "topk" or self.training:
            k = max(1, int(self.capacities()[r] * T))
            masked = logits.detach().masked_fill(~prev, float("-inf"))
            idx = masked.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
            topk_active = torch.zeros_like(prev).scatter_(1, idx, True)
        if rule == "topk":
            active, valid = topk_active, None
        else:
            if rule == "threshold":
                score = logits.detach() > self.threshold[r]
            else:
                score = self.aux_scorers[r](h.detach()).squeeze(-1) > 0
            active = prev & score
            idx, valid = compact(active)
        if self.record is not None and topk_active is not None:  # calibration pass
            self.record.append((r, logits.detach()[prev], topk_active[prev]))
        if self.training and topk_active is not None:
            self._training_losses(r, h, logits, prev, topk_active, aux, stats)
        stats[f"router/load_r{r}"] = active.float().mean().detach()
        if r == self.n_rec - 1:
            stats["router/dead_token_ratio"] = (~active.any(0)).float().mean().detach()
        gate = self.gate(torch.gather(logits, 1, idx))
        return Selection(idx=idx, valid=valid, active=active, gate=gate)

    def _training_losses(self, r, h, logits, prev, target, aux, stats) -> None:
        cfg = self.cfg
        n_tok = prev.numel()
        t = target.float()
        cand = prev.float()
        aux_logits = None
        if cfg.aux_loss == "bce":  # normalized per token of the micro-batch (sum over candidates / B*T)
            bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
            aux[f"router_bce_r{r}"] = cfg.aux_coeff * (bce * cand).sum() / n_tok
        elif cfg.aux_loss == "aux_router":  # trains only the aux scorer: its input is detached
            aux_logits = self.aux_scorers[r](h.detach()).squeeze(-1).float()
            bce = F.binary_cross_entropy_with_logits(aux_logits, t, reduction="none")
            aux[f"aux_router_bce_r{r}"] = (bce * cand).sum() / n_tok
        if cfg.z_coeff > 0:
            aux[f"router_z_r{r}"] = self.z_loss(logits, cand)
        with torch.no_grad():  # does the causal rule agree with top-k on the candidates?
            if aux_logits is not None:  # reuse: a second aux-scorer pass would be uncounted FLOPs
                causal = aux_logits.detach() > 0
            else:
                causal = logits > self.threshold[r]
            agree = ((causal == target).float() * cand).sum() / cand.sum().clamp_min(1)
            stats[f"router/sampling_acc_r{r}"] = agree

    @torch.no_grad()
    def calibrate(self, run_batches) -> dict[str, float]:
        """Fit each threshold so the causal rule selects the share of candidates that top-k did.

        `run_batches()` runs the model forward over held-out data; we record during it."""
        self.record, self.rule = [], "topk"
        try:
            run_batches()
            rec = self.record
        finally:
            self.record, self.rule = None, None
        out = {}
        for r in range(self.n_rec):
            lg = torch.cat([x[1] for x in rec if x[0] == r]).float()
            tg = torch.cat([x[2] for x in rec if x[0] == r])
            share = tg.float().mean().item()
            # quantile() has an input-size limit; a strided subsample is plenty for one scalar
            lg = lg[:: max(1, lg.numel() // 1_000_000)]
            self.threshold[r] = float("-inf") if share >= 1 else torch.quantile(lg, max(1 - share, 0.0))
            out[f"threshold_r{r}"] = float(self.threshold[r])
        return out
