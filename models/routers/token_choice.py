"""Token-choice routing (paper eq. 2.2): one router on the first recursion's input gives each token
its depth (top-1 over N_r experts). Causal by construction: a token's depth depends only on its own
hidden state. Intermediate recursions pass the block output on ungated; after its last recursion a
token's output is h_1 + g * Block^d(h_1) (as the official code does).

Balancing: ``balance`` (Switch-style loss, aux_coeff * sum_i f_i P_i), ``loss_free`` (a bias on the
scores used only for the top-1 choice, b_i += u * sign(mean_load - load_i) after each optimizer
step), or ``none``; optional z-loss.

``capacity_factor`` (training only): recursion r computes a static ceil(cf * (N_r - r) / N_r * T)
slots per sequence, the perfectly balanced count times cf, so the training forward has static shapes
and no host sync (it compiles with fullgraph=True). Tokens over the bound keep their first-come
order: the earliest stay, later ones stop early (logged as ``router/dropped_r{r}``); no future token
influences a token's depth. Inference routes every token to its chosen depth. null (the default,
the paper's rule): nothing is dropped and each recursion costs one host sync to size its batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError
from .base import Router, Selection, compact, make_scorer, register_router


@register_router("token_choice")
class TokenChoiceRouter(Router):
    kind = "token"
    allowed_aux = ("balance", "loss_free", "none")
    allowed_func = ("softmax", "sigmoid")

    def __init__(self, cfg, d_model, num_recursions):
        super().__init__(cfg, d_model, num_recursions)
        if cfg.capacity is not None:
            raise ConfigError(
                "model.router.capacity is an expert-choice knob; token-choice assigns depths per token "
                "(set it to null)"
            )
        if cfg.capacity_factor is not None and cfg.capacity_factor < 1:
            raise ConfigError(
                f"model.router.capacity_factor={cfg.capacity_factor} must be >= 1 (or null): "
                "below 1 even perfectly balanced routing would drop tokens"
            )
        self.scorer = make_scorer(cfg.arch, d_model, num_recursions)
        self.register_buffer("bias", torch.zeros(num_recursions))
        self.register_buffer("load_acc", torch.zeros(num_recursions))

    def capacities(self) -> list[float]:
        """Share of tokens the block computes per recursion: the balanced share, or the slot bound."""
        share = super().capacities()
        cf = self.cfg.capacity_factor
        return share if cf is None else [min(1.0, cf * c) for c in share]

    def slots(self, r: int, T: int) -> int | None:
        """Static width of recursion r in training under a capacity factor; None = exact count."""
        if self.cfg.capacity_factor is None or not self.training:
            return None
        return min(T, math.ceil(self.capacities()[r] * T))

    def score(self, h: Tensor, r: int = 0) -> Tensor:
        return self.scorer(h)  # [B, T, N_r]

    def probs(self, logits: Tensor) -> Tensor:
        z = logits.float() / self.cfg.temperature
        return torch.softmax(z, -1) if self.cfg.func == "softmax" else torch.sigmoid(z)

    def plan(self, h1: Tensor, aux: dict, stats: dict):
        logits = self.score(h1)
        p = self.probs(logits)
        choice = (p.detach() + self.bias).argmax(-1)  # bias steers the choice only
        gate = self.cfg.alpha * torch.gather(p, -1, choice[..., None]).squeeze(-1)
        n = self.n_rec
        onehot = F.one_hot(choice, n).float()
        frac = onehot.flatten(0, -2).mean(0)  # share of tokens per depth
        if self.training:
            if self.cfg.aux_loss == "balance":
                P = p.flatten(0, -2).mean(0)
                aux["router_balance"] = self.cfg.aux_coeff * (n * frac * P).sum()
            elif self.cfg.aux_loss == "loss_free":
                self.load_acc += frac.detach()
            if self.cfg.z_coeff > 0:
                aux["router_z"] = self.z_loss(logits)
        with torch.no_grad():
            pbar = p.flatten(0, -2).mean(0)
            stats["router/entropy"] = -(pbar * pbar.clamp_min(1e-9).log()).sum()
            stats["router/maxvio"] = (frac.max() - frac.mean()) / frac.mean()
        return choice, gate

    def select(self, r: int, h: Tensor, prev: Tensor, plan, aux: dict, stats: dict) -> Selection:
        choice, _ = plan
        chosen = prev & (choice >= r)
        k = self.slots(r, chosen.shape[1])
        idx, valid = compact(chosen, k)
        active = chosen
        if k is not None:  # tokens over the bound stop here
            active = torch.zeros_like(chosen).scatter_(1, idx, valid)
            stats[f"router/dropped_r{r}"] = (chosen & ~active).float().mean().detach()
        stats[f"router/load_r{r}"] = active.float().mean().detach()
        if r == self.n_rec - 1:
            stats["router/dead_token_ratio"] = (~active.any(0)).float().mean().detach()
        return Selection(idx=idx, valid=valid, active=active, gate=None)

    @torch.no_grad()
    def post_step(self) -> None:
        if self.cfg.aux_loss != "loss_free" or not self.load_acc.any():
            return
        load = self.load_acc.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self.bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_acc.zero_()
