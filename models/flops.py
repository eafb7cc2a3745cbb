"""Analytic parameter, FLOP and KV-byte counts that understand sharing and routing.

Two FLOP conventions:

* ``exact``: what our kernels execute, matching `torch.utils.flop_counter.FlopCounterMode`:
  every matmul (GQA-sized K/V projections, LM head, routers) and SDPA over the tokens actually
  attended (full square of the compacted length: the counter does not halve causal attention).
  `flops_per_token(...).train` = forward + backward (matmul backward = 2x forward, SDPA backward =
  2.5x forward, as the counter's formulas say for fused flash/efficient kernels).
  Caveats, torch 2.13: on CPU, SDPA (with `is_causal` or with a boolean `attn_mask` alike) runs
  `aten._scaled_dot_product_flash_attention_for_cpu`, for which the counter has no formula, so it
  counts attention as 0; tests register the counter's own SDPA formulas for that op. Under the
  math backend SDPA decomposes into bmm + softmax: the forward count is the same, the backward is
  2x instead of 2.5x. Variable-count routing (token-choice, threshold rules) pads each recursion's
  token set to the batch's largest; that padding runs but is not counted here.
* ``paper``: the paper's App. D rule as reconstructed in reference/paper.md 6.4: forward only,
  per executed layer 2*(4 d^2 + 3 d d_ff)*c + 2*N_ctx*d*c^2 (K/V counted full width, attention
  causal-halved, embeddings/head/routers excluded). It reproduces the paper's Table 9 token counts.

`c` is the fraction of tokens that reach a layer: 1 for unique layers and unrouted models, the
recursion's capacity for MoR (recursion-wise caching: attention among the c*T active tokens, so
c^2). Under recursive KV sharing, later recursions skip K/V projections and attend over the first
recursion's keys (c * c_0).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .recursive import slot_recursions


@dataclass(frozen=True)
class Flops:
    forward: float  # per token
    train: float  # forward + backward per token (paper convention: = forward, the paper's budget rule)


def _slots(cfg: ModelConfig, fractions: list[float]):
    """(fraction of tokens, fraction of keys, kv_shared) for each effective layer."""
    rec = slot_recursions(cfg)
    first = fractions[0] if fractions else 1.0
    for r in rec:
        c = 1.0 if r < 0 else fractions[r]
        shared = cfg.kv == "share" and r > 0
        yield c, (first if shared else c), shared


def flops_per_token(
    cfg: ModelConfig, seq_len: int, convention: str, fractions: list[float], extra_forward: float = 0.0
) -> Flops:
    d, ff, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    if convention == "paper":
        total = 0.0
        for c, ck, shared in _slots(cfg, fractions):
            proj = (2 * d * d if shared else 4 * d * d) + 3 * d * ff
            attn = 2 * seq_len * d * c * ck  # shared: keys are recursion 1's (ck = its fraction)
            total += 2 * proj * c + attn
        return Flops(total, total)
    if convention != "exact":
        raise ValueError(f"convention={convention!r} is invalid: allowed exact, paper")
    q_o = 2 * d * cfg.n_heads * hd
    kv = 2 * d * cfg.n_kv_heads * hd
    mlp = 3 * d * ff
    lin = attn = 0.0
    for c, ck, shared in _slots(cfg, fractions):
        lin += 2 * (q_o + mlp + (0 if shared else kv)) * c
        # SDPA: QK^T and AV over Tq = c*T queries and Tk = ck*T keys, per token of the sequence
        attn += 4 * cfg.n_heads * hd * c * ck * seq_len
    lin += 2 * d * cfg.vocab_size + extra_forward
    return Flops(lin + attn, 3 * lin + 3.5 * attn)


def kv_bytes_per_token(
    cfg: ModelConfig, dtype_bytes: int, fractions: list[float], recursion_only: bool = False
) -> float:
    """Cached K+V bytes per token of sequence: slots owning storage, times the share of tokens cached."""
    per_slot = 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    rec = slot_recursions(cfg)
    total = 0.0
    for (c, _, shared), r in zip(_slots(cfg, fractions), rec, strict=True):
        if shared or (recursion_only and r < 0):
            continue
        total += per_slot * c
    return total


def budget_tokens(budget_flops: float, flops_per_tok: float) -> float:
    return budget_flops / flops_per_tok
