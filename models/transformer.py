"""Llama-style decoder LM; the base class of every family.

`TransformerLM` runs its unique `layers` in the order given by `recursive.schedule(cfg)`: plain
depth for vanilla, repeated blocks for recursive models. MoR overrides only the recursion part
(`models/mor.py`). The model contract (DESIGN.md):

    forward(input_ids, labels=None, cache=None, position_ids=None) -> ModelOutput
    num_params(unique=True, embedding=False), flops_per_token(seq_len, ...), kv_bytes_per_token()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flops as flops_lib
from .config import ConfigError, ModelConfig
from .kv_cache import KVCache, SharedKV, SlotPlan
from .layers import Block, RMSNorm, Rotary
from .recursive import layout, schedule, slot_recursions


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Tensor | None = None  # mean CE of logits[:, t] vs labels[:, t] (labels pre-shifted); -100 ignored
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # already weighted; add them all
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached diagnostics (log as-is)


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        pre, block, coda = layout(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(pre + block + coda))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.schedule = schedule(cfg)
        self.plan = self.slot_plan()
        self.reset_parameters()

    # -- construction -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Llama/SmolLM init: every weight N(0, init_std), norms at one."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def slot_plan(self) -> SlotPlan:
        rec = slot_recursions(self.cfg)
        source = list(range(len(self.schedule)))
        if self.cfg.kv == "share":  # later recursions read the first recursion's slot of the same layer
            first = {self.schedule[s]: s for s in range(len(rec)) if rec[s] == 0}
            source = [first[self.schedule[s]] if rec[s] > 0 else s for s in source]
        return SlotPlan(group=self.group_of_slot(rec), source=source)

    def group_of_slot(self, rec: list[int]) -> list[int]:
        return [0] * len(rec)  # every token visits every layer

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        logits_index: Tensor | None = None,
    ) -> ModelOutput:
        """`logits_index` [B, k]: compute logits only at these positions (scoring needs a few of T;
        the LM head is the largest matmul at a 49k vocabulary). Not combinable with `labels`."""
        B, T = input_ids.shape
        start = cache.seen if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ConfigError(
                f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        aux: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        x = self.trunk(x, position_ids, cache, aux, stats)
        if cache is not None:
            cache.seen += T
        h = self.norm(x)
        if logits_index is not None:
            if labels is not None:
                raise ValueError("logits_index and labels cannot be combined: the loss needs every position")
            h = torch.gather(h, 1, logits_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        logits = self.logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, aux_losses=aux, stats=stats)

    def logits(self, h: Tensor) -> Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    def run_slots(
        self, x: Tensor, pos: Tensor, slots, ctx, group: int, valid: Tensor | None = None
    ) -> Tensor:
        """Apply effective layers `slots` to tokens x at absolute positions pos (valid: real rows)."""
        rope = self.rotary(pos)
        for s in slots:
            if ctx is None:
                hook = None
            else:
                hook = ctx.hook(s, group) if isinstance(ctx, KVCache) else ctx.hook(s, pos, valid)
            x = self.layers[self.schedule[s]](x, rope, hook)
        return x

    def trunk(self, x: Tensor, pos: Tensor, cache: KVCache | None, aux: dict, stats: dict) -> Tensor:
        ctx = cache if cache is not None else SharedKV(self.plan) if self.cfg.kv == "share" else None
        if cache is not None:
            cache.begin(0, pos)
        return self.run_slots(x, pos, range(len(self.schedule)), ctx, 0)

    # -- caches and decoding --------------------------------------------------------------------
    def make_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        p = next(self.parameters())
        return KVCache(
            self.plan,
            batch,
            max_len or self.cfg.max_seq_len,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            dtype or p.dtype,
            device or p.device,
        )

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, generator=None):
        """Cached decoding: prefill the prompt, then one token at a time (greedy if temperature=0)."""
        B, T = input_ids.shape
        cache = self.make_cache(B, T + max_new_tokens)
        logits = self(input_ids, cache=cache).logits[:, -1]
        out = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self(nxt, cache=cache).logits[:, -1]
        return torch.cat(out, 1)

    # -- analytic accounting ----------------------------------------------------------------------
    def num_params(self, unique: bool = True, embedding: bool = False) -> int:
        """Parameters; `unique=False` counts a shared layer once per application (works on meta)."""
        total = sum(p.numel() for p in self.parameters())
        if not unique:
            per_layer = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]
            total += sum(per_layer[i] for i in self.schedule) - sum(per_layer)
        if not embedding:
            total -= self.embed_tokens.weight.numel() + (self.lm_head.weight.numel() if self.lm_head else 0)
        return total

    def depth_fractions(self) -> list[float]:
        """Expected fraction of tokens that reach each recursion (1.0 everywhere without routing)."""
        return [1.0] * self.cfg.num_recursions

    def flops_per_token(self, seq_len: int, convention: str = "exact", fractions: list[float] | None = None):
        return flops_lib.flops_per_token(
            self.cfg, seq_len, convention, fractions or self.depth_fractions(), self.extra_flops_per_token()
        )

    def extra_flops_per_token(self) -> float:
        """Forward FLOPs/token outside the Blocks and LM head (routers); exact convention only."""
        return 0.0

    def kv_bytes_per_token(self, dtype_bytes: int = 2, fractions: list[float] | None = None) -> float:
        return flops_lib.kv_bytes_per_token(self.cfg, dtype_bytes, fractions or self.depth_fractions())
