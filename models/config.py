"""Model configuration: one dataclass drives every family (vanilla, recursive, MoR).

The same dataclasses are registered as Hydra structured configs by the harness, so a misspelled
key is an error. Validation lives in `ModelConfig.validate()` and runs at model construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("vanilla", "recursive", "mor")
SHARINGS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
KV_MODES = ("cache", "share")


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key and the allowed values."""


@dataclass
class RouterConfig:
    """Knobs of the MoR router. `name` is a registered router or a dotted import path."""

    name: str = "expert_choice"  # registry name (models/routers) or "pkg.module.Class"
    arch: str = "linear"  # linear | mlp (hidden 2d) | wide_mlp (hidden 4d, as the paper says)
    func: str = "sigmoid"  # expert: sigmoid | tanh ; token: softmax | sigmoid
    alpha: float = 0.1  # gate scale after func (paper: 0.1 expert, 1.0 token)
    temperature: float = 1.0  # divides the router logits
    capacity: list[float] | None = None  # expert-choice per-recursion capacity; None -> (N_r-r+1)/N_r
    capacity_factor: float | None = None  # token-choice: static slots per recursion (see README)
    capacity_warmup_steps: int = 0  # cosine anneal of capacity from 1.0 to target over these steps
    aux_loss: str = "bce"  # expert: bce | aux_router | none ; token: balance | loss_free | none
    aux_coeff: float = 0.001  # weight of the BCE (expert) or balancing (token) loss
    z_coeff: float = 0.0  # router z-loss weight (0 = off)
    bias_update_rate: float = 0.001  # loss-free balancing bias step u (token-choice, aux_loss=loss_free)
    inference: str = "threshold"  # expert-choice rule outside training: topk | threshold | aux_router
    params: dict[str, Any] = field(default_factory=dict)  # extra knobs for user-defined routers


@dataclass
class ModelConfig:
    """Architecture. Sizes follow the paper's Table 6; recursion and routing on top."""

    family: str = "vanilla"  # vanilla | recursive | mor
    vocab_size: int = 49152
    d_model: int = 960
    n_layers: int = 32  # effective depth of the vanilla base model
    n_heads: int = 15
    n_kv_heads: int = 5
    d_ff: int = 2560
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    # recursion (recursive and mor)
    num_recursions: int = 1
    sharing: str = "middle_cycle"  # cycle | sequence | middle_cycle | middle_sequence
    block_layers: int | None = None  # unique layers per recursion; None -> ceil(depth / N_r)
    kv: str = "cache"  # cache (recursion-wise caching) | share (recursive KV sharing)
    router: RouterConfig = field(default_factory=RouterConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"model.{key}={value!r} is invalid: {allowed}")

        if self.family not in FAMILIES:
            raise bad("family", self.family, f"allowed: {', '.join(FAMILIES)}")
        if self.sharing not in SHARINGS:
            raise bad("sharing", self.sharing, f"allowed: {', '.join(SHARINGS)}")
        if self.kv not in KV_MODES:
            raise bad("kv", self.kv, f"allowed: {', '.join(KV_MODES)}")
        if self.d_model % self.n_heads:
            raise bad("n_heads", self.n_heads, f"must divide model.d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", self.n_kv_heads, f"must divide model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise bad("n_heads", self.n_heads, "d_model / n_heads must be even for RoPE")
        if self.num_recursions < 1:
            raise bad("num_recursions", self.num_recursions, "must be >= 1")
        if self.family == "vanilla" and self.num_recursions != 1:
            raise bad(
                "num_recursions", self.num_recursions, "the vanilla family has 1 (use family=recursive)"
            )
        middle = self.sharing.startswith("middle")
        avail = self.n_layers - (2 if middle else 0)
        if self.num_recursions > max(avail, 1):
            raise bad(
                "num_recursions",
                self.num_recursions,
                f"must be <= {avail} layers available to share (model.n_layers={self.n_layers}, "
                f"model.sharing={self.sharing})",
            )
        if self.block_layers is not None and self.block_layers < 1:
            raise bad("block_layers", self.block_layers, "must be >= 1 or null")
        if self.family == "mor" and self.sharing not in ("cycle", "middle_cycle"):
            raise bad("sharing", self.sharing, "MoR needs a repeated block: allowed cycle, middle_cycle")
        if self.kv == "share" and self.family == "vanilla":
            raise bad("kv", self.kv, "recursive KV sharing needs family=recursive or mor")
        if self.kv == "share" and self.sharing not in ("cycle", "middle_cycle"):
            raise bad(
                "kv", self.kv, "KV sharing reuses recursion 1's cache: needs sharing=cycle or middle_cycle"
            )
