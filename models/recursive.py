"""Recursive (shared-block) layouts: which unique layer runs at each effective depth.

A recursive model is a `TransformerLM` whose unique layers are applied in the order given by
`schedule(cfg)` (paper Table 1, L = effective depth, N_r recursions):

* cycle           [(0,1,2),(0,1,2),(0,1,2)]   the block repeats
* sequence        [(0,0,0),(1,1,1),(2,2,2)]   each layer repeats in place
* middle_cycle    unique first layer + cycle + unique last layer (the paper's choice)
* middle_sequence unique first layer + sequence + unique last layer

Nothing else differs from vanilla: same kernels, same code path. MoR routes the repeated block
(`models/mor.py`); recursive KV sharing (`kv=share`) makes later recursions reuse recursion 1's K/V.
"""

from __future__ import annotations

import math

from .config import ModelConfig


def layout(cfg: ModelConfig) -> tuple[int, int, int]:
    """(prelude, block, coda) unique layer counts; effective depth = prelude + block * N_r + coda.

    The shared block has `block_layers` layers, by default ceil(available / N_r): like the paper,
    depth is rounded up when it is not divisible (360M N_r=4: 1+8x4+1 = 34 layers)."""
    if cfg.family == "vanilla" or cfg.num_recursions == 1 and cfg.block_layers is None:
        return 0, cfg.n_layers, 0
    edge = 1 if cfg.sharing.startswith("middle") else 0
    block = cfg.block_layers or math.ceil((cfg.n_layers - 2 * edge) / cfg.num_recursions)
    return edge, block, edge


def schedule(cfg: ModelConfig) -> list[int]:
    """Unique-layer index applied at each effective depth."""
    pre, block, coda = layout(cfg)
    n = cfg.num_recursions if cfg.family != "vanilla" else 1
    if cfg.sharing in ("cycle", "middle_cycle") or n == 1:
        core = [pre + i for _ in range(n) for i in range(block)]
    else:  # sequence: each unique layer repeated N_r times in a row
        core = [pre + i for i in range(block) for _ in range(n)]
    return list(range(pre)) + core + [pre + block + i for i in range(coda)]


def slot_recursions(cfg: ModelConfig) -> list[int]:
    """Recursion index (0-based) of each effective layer; -1 for the unique first/last layers."""
    pre, block, coda = layout(cfg)
    n = len(schedule(cfg)) - pre - coda
    if cfg.sharing in ("cycle", "middle_cycle") or block == n:
        core = [i // block for i in range(n)]
    else:  # sequence sharing interleaves recursions layer by layer
        core = [i % cfg.num_recursions for i in range(n)]
    return [-1] * pre + core + [-1] * coda
