"""Router base class and the open registry.

A router decides, per token, how many recursions of the shared block it gets. The two selection
schemes of the paper live in `ExpertChoiceRouter` (per-recursion capacity top-k with hierarchical
filtering) and `TokenChoiceRouter` (one depth per token, decided up front). They own selection,
capacity schedules, auxiliary losses and metrics; a new router subclasses one of them, overrides
`score()`, and registers itself:

    @register_router("my_router")
    class MyRouter(ExpertChoiceRouter):
        def score(self, h, r): ...

`model.router.name` takes a registered name (every module in `models/routers/` is imported on
lookup) or a dotted import path to a Router class defined anywhere.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import ConfigError, RouterConfig

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    def deco(cls):
        ROUTERS[name] = cls
        cls.registered_name = name
        return cls

    return deco


def get_router_class(name: str) -> type[Router]:
    if "." in name:  # dotted path: pkg.module.Class
        mod, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model.router.name={name!r}: cannot import it ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise ConfigError(f"model.router.name={name!r} is not a Router subclass")
        return cls
    from .. import routers as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    if name not in ROUTERS:
        close = difflib.get_close_matches(name, ROUTERS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = ", ".join(sorted(ROUTERS))
        raise ConfigError(f"model.router.name={name!r} is not a registered router (known: {known}){hint}")
    return ROUTERS[name]


def make_scorer(arch: str, d_model: int, n_out: int) -> nn.Module:
    """linear: d->n (no bias); mlp: d->2d->n; wide_mlp: d->4d->n (the paper's 4x; official code used 2x)."""
    if arch == "linear":
        return nn.Linear(d_model, n_out, bias=False)
    hidden = {"mlp": 2, "wide_mlp": 4}.get(arch)
    if hidden is None:
        raise ConfigError(f"model.router.arch={arch!r} is invalid: allowed linear, mlp, wide_mlp")
    return nn.Sequential(nn.Linear(d_model, hidden * d_model), nn.GELU(), nn.Linear(hidden * d_model, n_out))


@dataclass
class Selection:
    """Tokens processed at one recursion, compacted in causal order."""

    idx: Tensor  # [B, K] positions of the selected tokens, ascending
    valid: Tensor | None  # [B, K] False for padding entries (variable-count rules); None = all valid
    active: Tensor  # [B, T] bool, tokens active at this recursion
    gate: Tensor | None  # [B, K] per-recursion gate (expert-choice); None when applied at the end


def compact(active: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Indices of active tokens first, in position order, and which of them are real (not padding).

    Width `k` (static, no host sync): rows with more than k active tokens keep their first k (the
    earliest positions, so a token's fate depends only on earlier tokens: causal). Width None: the
    batch's max count (one host sync, nothing dropped)."""
    if k is None:
        k = int(active.sum(1).max())
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, : min(k, active.shape[1])]
    return order, torch.gather(active, 1, order)


class Router(nn.Module):
    kind: ClassVar[str] = ""  # "expert" or "token"
    registered_name: ClassVar[str] = ""
    allowed_aux: ClassVar[tuple[str, ...]] = ()
    allowed_func: ClassVar[tuple[str, ...]] = ()
    # does the decode engine's per-token decision (score/threshold/gate, or plan) reproduce this
    # router's select()? False (mod: no hierarchy; act: accumulated halting): served approximately
    engine_exact: ClassVar[bool] = True

    def __init__(self, cfg: RouterConfig, d_model: int, num_recursions: int):
        super().__init__()
        self.cfg, self.d_model, self.n_rec = cfg, d_model, num_recursions
        if cfg.aux_loss not in self.allowed_aux:
            raise ConfigError(
                f"model.router.aux_loss={cfg.aux_loss!r} is invalid for {type(self).__name__}: "
                f"allowed {', '.join(self.allowed_aux)}"
            )
        if cfg.func not in self.allowed_func:
            raise ConfigError(
                f"model.router.func={cfg.func!r} is invalid for {type(self).__name__}: "
                f"allowed {', '.join(self.allowed_func)}"
            )
        if cfg.temperature <= 0:
            raise ConfigError(f"model.router.temperature={cfg.temperature} must be > 0")
        self.step = 0  # optimizer step, set by the trainer (capacity/balancing warm-ups)

    def read_params(self, *allowed: str) -> dict:
        """`model.router.params` after checking every key is one this router knows."""
        params = dict(self.cfg.params or {})
        unknown = set(params) - set(allowed)
        if unknown:
            name = self.registered_name or type(self).__name__
            keys = ", ".join(allowed)
            raise ConfigError(
                f"model.router.params has unknown keys {sorted(unknown)} for {name}: allowed {keys}"
            )
        return params

    def score(self, h: Tensor, r: int) -> Tensor:
        """Router logits for hidden states h [B, T, d] at recursion r. Override this."""
        raise NotImplementedError

    def capacities(self) -> list[float]:
        """Expected fraction of tokens reaching each recursion (for FLOPs and KV accounting)."""
        return [(self.n_rec - r) / self.n_rec for r in range(self.n_rec)]

    def z_loss(self, logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """(log sum_j exp x_j)^2 averaged over (masked) tokens; a single logit x gives x^2."""
        lse = logits.float() if logits.dim() == 2 else torch.logsumexp(logits.float(), -1)
        if mask is None:
            return self.cfg.z_coeff * lse.pow(2).mean()
        return self.cfg.z_coeff * (lse.pow(2) * mask).sum() / mask.sum().clamp_min(1)

    def flops_per_token(self) -> float:
        """Forward FLOPs per token of the scorers (exact convention)."""
        return sum(2 * p.numel() for n, p in self.named_parameters() if p.dim() == 2)

    def post_step(self) -> None:
        """Called after each optimizer step (loss-free bias updates)."""

    def bind(self, model: nn.Module) -> None:
        """Called once by the model that owns this router, after construction.

        A router that needs more than hidden states (e.g. the input token ids) registers hooks on
        `model` here. Keep no reference to `model` as a module attribute (it would become a
        submodule of the router, a cycle)."""
