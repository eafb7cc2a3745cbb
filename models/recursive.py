"""Recursive (shared-block) baselines.

A recursive model is a `TransformerLM` whose unique layers are applied in the order of
`ModelConfig.schedule()` (paper Table 1): cycle [(0,1,2),(0,1,2)], sequence [(0,0),(1,1),(2,2)],
and the middle_* variants with a unique first and last layer. Recursive KV sharing (`kv=share`)
makes later recursions reuse the first recursion's K/V. Nothing else differs from vanilla, which
is the point: same kernels, same code path.
"""

from .config import ModelConfig
from .transformer import TransformerLM


def recursive_lm(cfg: ModelConfig) -> TransformerLM:
    assert cfg.family == "recursive", cfg.family
    return TransformerLM(cfg)
