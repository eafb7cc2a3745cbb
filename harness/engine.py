"""Decode engine: static-size KV caches and continuous batching for every family.

    engine = make_engine(model, batch_size=32, max_len=512)
    results = engine.run([Request([0], 256), ...])      # FIFO; results in request order

Vanilla and recursive models: **continuous sequence-wise batching**. `batch_size` rows decode one
token each per step; a row whose request is done is refilled at once from the queue (its cache row
is simply reused from column 0: masks come from host-side lengths, so nothing is cleared), while
the other rows go on at their own positions. The host needs nothing back from the device until the
end of `run()`: no sync per step.

MoR: **continuous depth-wise batching**. An *item* is the in-flight token of a sequence at its
current recursion depth r. Each engine step

1. *edge stage*: items that finished their recursions accumulate (FIFO) until `flush_at` of them
   wait (paper: "accumulated up to the maximum batch size"), or until nothing else can run; then
   they go together through the last unique layer(s), the LM head, sampling, the next token's
   embedding and the first unique layer(s). Rows whose request is done are refilled from the
   request queue in the same stage. The new items get their recursion-0 router decision here.
2. *block stage*: up to `batch_size` items, of different sequences and different depths, go
   through the shared block together. Items are sorted by depth so per-depth work (router scorers,
   K/V projections under KV sharing) runs on contiguous slices. After the block, the router scores
   recursion r+1 (expert-choice, causal rule: the token continues while its score is above the
   recursion's threshold; hierarchical: the first failure ends it) or the depth chosen up front
   decides (token-choice). An item that stops leaves the block; its place goes to the next waiting
   item (FIFO).
3. one host sync: the routing decisions come back (they schedule the next step). Token ids stay on
   the device until the end of `run()`.

Cache layout. Every attention buffer is `[seq_slots, n_kv, columns, head_dim]`, one row per sequence
slot, allocated once. The unique first/last layers have max_len columns (every token is cached at
its position). Shared-block layer j has one buffer with a column region per recursion: region r
(columns off[r] .. off[r] + W[r]) holds the tokens of the slot that were active at recursion r
(recursion-wise caching), written at the region's own length. W[0] = max_len and W[r] = capacity_r x
max_len x (1 + kv_slack), so the allocation itself shows the (N_r + 1) / 2N_r saving; a sequence whose
tokens go deeper than that widens the region (a copy into a wider buffer, counted in
stats["kv_grows"]). Under recursive KV sharing only region 0 exists and later recursions read it
without projecting K/V. The host knows every length, so it builds each read's additive attention
bias (0 on a row's first `count` keys, -inf after; L the step's longest, a Python int: caches are
sliced to the active bound) and gather indices in numpy, and uploads them with the step's other
arrays (`_Pack`: one int and one float host-to-device copy per stage, pinned and non-blocking, so
not a sync; none on CPU, where the tensors share the arrays). Keys carry RoPE of their absolute
positions, so a compacted recursion cache needs no position table.

Reading the caches of a batch of items, per recursion segment of the step (`_seg`, one region):
*identity* (the items are exactly the slot rows, in order: read in place), *range* (the items are
consecutive rows, in order: that range read in place), *slab* (at least half of the rows from the
items' first to their last are items: attend over that row range in place with zero queries on the
other rows and drop their outputs), or *gather* (copy just the items' rows). No loop over tokens;
the only Python loops in a step are over layers and (at most N_r) recursion segments.

`cuda_graphs=True` replays each vanilla step's layer stack, and each MoR block pass (the shared
block's layers), as one CUDA graph (`_Graphs`; a GPU spends more on launching these small layers'
kernels than on running them): the pass is padded to the batch (the padding writes to one extra cache
row), its keys rounded up to a multiple of GRAPH_KEYS, read in place when every vanilla row is in the
pass and as one gather otherwise (one graph per read kind and multiple).
MoR's edge stage stays eager. Off CUDA the same padded steps run uncaptured.

Attention takes each kv head's query heads as one query block (no K/V repeat): SDPA on GPU, two
matmuls and a softmax on CPU (`attend`). On CPU the engine also fuses Q/K/V and gate/up weights and
stores every matrix transposed (a copy, `fuse`); on GPU it uses the model's own weights.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import ConfigError

log = logging.getLogger("mor.engine")


@dataclass
class Request:
    prompt_ids: list[int]  # at least one token (prompt-free generation: [BOS])
    max_new_tokens: int


@dataclass
class Result:
    tokens: list[int]  # generated ids
    stats: dict = field(default_factory=dict)  # per-request: steps, latency, depth histogram, KV bytes
    logits: Tensor | None = None  # [max_new_tokens, vocab] when run(keep_logits=True)


def make_engine(model, batch_size: int, max_len: int, **kw) -> DecodeEngine:
    """The engine for the model's family: depth-wise for MoR, sequence-wise otherwise."""
    if hasattr(model, "router"):
        return DepthWiseEngine(model, batch_size, max_len, **kw)
    kw.pop("seq_slots", None)
    kw.pop("flush_at", None)
    return SequenceEngine(model, batch_size, max_len, **kw)


# -- one layer for single-token items --------------------------------------------------------------


class _Pack:
    """Host arrays gathered into one device tensor per kind: the int64 parts (indices, counts) and
    the float parts (attention biases, in the engine's dtype). Two host-to-device copies per stage;
    on CPU none: the tensors share the arrays' memory (the engine's ops there finish before the host
    touches an array again)."""

    def __init__(self):
        self.parts: list[np.ndarray] = []
        self.fparts: list[np.ndarray] = []

    def put(self, arr) -> int:
        self.parts.append(np.asarray(arr, dtype=np.int64).reshape(-1))
        return len(self.parts) - 1

    def putf(self, arr: np.ndarray) -> int:
        self.fparts.append(arr.reshape(-1))
        return len(self.fparts) - 1

    def upload(self, device, dtype: torch.dtype) -> list[Tensor]:
        """The int parts as device tensors; the float parts are kept in `self.floats`."""
        flat = self._shared if self.in_place(device) else self._flat
        self.floats = flat(self.fparts, device, dtype) if self.fparts else []
        return flat(self.parts, device, torch.long)

    @staticmethod
    def in_place(device) -> bool:
        return device.type == "cpu"

    @staticmethod
    def _shared(parts: list[np.ndarray], device, dtype) -> list[Tensor]:
        return [torch.from_numpy(a).to(dtype) for a in parts]

    @staticmethod
    def _flat(parts: list[np.ndarray], device, dtype) -> list[Tensor]:
        """One copy; every part starts at a multiple of ALIGN elements (CUDA's attention kernels
        fault on a misaligned bias). On CUDA the host side is pinned and the copy non-blocking: a
        copy from pageable memory, or a blocking one, waits for the stream to drain (PyTorch syncs
        after it), which would add two syncs to every stage. The caching host allocator keeps the
        pinned block until its copy is done."""
        sizes = [len(a) for a in parts]
        starts = np.concatenate([[0], np.cumsum([_aligned(n) for n in sizes])])
        kind = torch.from_numpy(parts[0]).dtype
        host_t = torch.zeros(int(starts[-1]), dtype=kind, pin_memory=device.type == "cuda")
        host = host_t.numpy()
        for a, s in zip(parts, starts):
            host[s : s + len(a)] = a
        flat = host_t.to(device=device, dtype=dtype, non_blocking=True)
        return [flat[s : s + n] for s, n in zip(starts.tolist(), sizes)]


def _to_host(t: Tensor) -> list:
    """The engine's deliberate device-to-host syncs: a MoR step's routing decisions, and every
    request's tokens at the end of `run()` (tests count them and forbid any other)."""
    return t.tolist()


GRAPH_KEYS = 64  # cuda_graphs: a stage's key count is rounded up to a multiple of this (a graph each)


class _Graphs:
    """A stage's layer loop `fn(x, cos, sin, widx, mask[, gather]) -> x` as CUDA graphs, one per
    set of input shapes (read kind and key count): captured at its first use, then replayed with
    the step's inputs copied into the captured ones (the weights and caches are read and written in
    place). The shapes take few values: the engine pads the stage's items to the batch (a pad cache
    row takes their writes) and its keys to a multiple of GRAPH_KEYS. Off CUDA the loop is called
    directly, on the same padded inputs (so CPU tests cover everything but the capture)."""

    def __init__(self, fn, capture: bool):
        self.fn, self.capture, self.graphs = fn, capture, {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0

    def __call__(self, *inputs: Tensor) -> Tensor:
        if not self.capture:
            return self.fn(*inputs)
        key = tuple(t.shape for t in inputs)  # the read kind and key count
        if key not in self.graphs:
            static = [t.clone() for t in inputs]
            side = torch.cuda.Stream()  # warm-up outside the graph (workspaces, lazy kernel loading);
            side.wait_stream(torch.cuda.current_stream())  # its cache writes are this step's own
            with torch.cuda.stream(side):
                self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*static)
            self.graphs[key] = (graph, static, out)
            self.captures += 1
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, inputs, strict=True):
            dst.copy_(src)
        graph.replay()
        return out  # overwritten by the next replay: used before it


def _pad(a: np.ndarray, m: int, fill: int) -> np.ndarray:
    """a (1-D) padded to length m with `fill`."""
    return np.concatenate([a, np.full(m - len(a), fill, dtype=a.dtype)])


@dataclass
class _Seg:
    """Items [a:b] of a step read keys from buffer rows r0 .. r0+rows-1, columns [c0:c0+L].

    identity (sidx and gather None): the items are rows 0..rows-1 in order, read in place;
    range (sidx and gather None): the items are rows r0..r0+rows-1 in order, read in place;
    slab (sidx): item i sits at row r0 + sidx[i]; the rows from the items' first to their last
        are attended in place (no copy) with zero queries on the other rows (their outputs are
        dropped);
    gather: item i's keys are copied from its own row and column window (one index_select of the
        buffer viewed as [-1, head_dim]: items of several recursions, whose windows start at different
        columns, in one read).
    mask: additive attention bias [rows or items, 1, 1, L] (0 or -inf), None when no key is masked.
    Every index and bias is built on the host (numpy); `_i` holds their pack slots until `resolve()`."""

    a: int
    b: int
    rows: int
    L: int
    c0: int = 0
    r0: int = 0
    sidx: Tensor | None = None
    gather: Tensor | None = None
    mask: Tensor | None = None
    _i: tuple = ()

    def resolve(self, parts: list[Tensor], pack: _Pack) -> None:
        """Pack slots -> device tensors (after `pack.upload`)."""
        kind, idx, bias = self._i
        if kind == "slab":
            self.sidx = parts[idx]
        elif kind == "gather":
            self.gather = parts[idx]
        if bias >= 0:
            self.mask = pack.floats[bias].view(-1, 1, 1, _bias_width(self.L))[..., : self.L]


@functools.cache
def _arange(n: int) -> np.ndarray:
    """np.arange(n), made once (read-only): the host plans a stage with many small arrays."""
    a = np.arange(n)
    a.flags.writeable = False
    return a


def _seg_kind(slab: int, rows: np.ndarray) -> str:
    lo = int(rows.min())
    span = int(rows.max()) - lo + 1
    if span == len(rows) and (rows - lo == _arange(span)).all():
        # range, MoR: a run's first waves (cohorts that went through the edge together)
        return "identity" if lo == 0 and span == slab else "range"
    # reading the rows from the first item's to the last's in place beats copying half of them
    # (measured, CPU)
    return "slab" if 2 * len(rows) >= span else "gather"


ALIGN = 8  # elements: 16 bytes in bf16, the alignment CUDA's attention kernels need of a bias


def _aligned(n: int) -> int:
    """n rounded up to a multiple of ALIGN."""
    return _aligned_to(n, ALIGN)


def _aligned_to(n: int, k: int) -> int:
    """n rounded up to a multiple of k."""
    return -(-n // k) * k


def _bias_width(L: int) -> int:
    """Columns of a stored bias row: the next multiple of ALIGN above L. Always more than L, so the
    view the attention sees always has the same (strided) layout: under torch.compile a layout
    that is sometimes contiguous is a second graph, built inside the timed run."""
    return _aligned(L + 1)


@functools.cache
def _bias_rows(w: int) -> tuple[int, np.ndarray]:
    """m, a power of two >= w, and the w-wide windows (a view) over m zeros then m -inf: window
    m - c is a bias row with c zeros."""
    m = 1 << (w - 1).bit_length()
    ramp = np.concatenate([np.zeros(m, np.float32), np.full(m, -np.inf, np.float32)])
    return m, np.lib.stride_tricks.sliding_window_view(ramp, w)


def _bias(counts: np.ndarray, L: int) -> np.ndarray:
    """Additive attention bias [len(counts), `_bias_width(L)`]: 0 on each row's first `count` keys,
    -inf after (each row starts aligned; `_Seg.resolve` views its first L columns). One copy."""
    m, rows = _bias_rows(_bias_width(L))
    return rows[m - counts]


def _seg(
    pack: _Pack,
    a: int,
    b: int,
    slab: int,
    rows: np.ndarray,
    counts: np.ndarray,
    width: int,
    kvh: int,
    c0: int | np.ndarray = 0,
    bucket: int = 1,
) -> _Seg:
    """Plan how items [a:b] (rows `rows` of a [>= slab, kvh, width, hd] buffer, keys `counts`) read
    their keys from column c0 on (one int, or one per item: then always a gather, its key count
    rounded up to a multiple of `bucket`; so is an in-place read's, whose buffer must have the
    columns)."""
    per_item = isinstance(c0, np.ndarray)
    kind = "gather" if per_item else _seg_kind(slab, rows)
    L = int(counts.max())
    if kind != "slab":
        L = _aligned_to(L, bucket)
    seg = _Seg(a, b, slab, L, 0 if per_item else c0)
    idx, masked = -1, counts
    if kind in ("range", "slab"):  # in place over rows r0 .. r0+span-1
        seg.r0, seg.rows = int(rows.min()), int(rows.max() - rows.min()) + 1
    if kind == "slab":  # the rows that are not items attend to one key (their outputs are dropped)
        idx, masked = pack.put(rows - seg.r0), np.ones(seg.rows, dtype=np.int64)
        masked[rows - seg.r0] = counts
    elif kind == "gather":  # flat [item, kv head, column] indices from each item's window start
        # columns past an item's count are masked: they repeat its last key (read already, and
        # never past its window)
        start = (rows[:, None] * kvh + _arange(kvh)) * width + (c0[:, None] if per_item else c0)
        cols = np.minimum(_arange(L), counts[:, None] - 1)
        idx = pack.put(start[:, :, None] + cols[:, None, :])
    # e.g. a batch of equal-length requests (not in a graph: one whose mask is sometimes None is two)
    full = kind == "identity" and bucket == 1 and bool((counts == L).all())
    seg._i = (kind, idx, -1 if full else pack.putf(_bias(masked, L)))
    return seg


class FastLayer:
    """A Block's weights arranged for single-token decoding. With `fuse` (a copy of those weights,
    default on CPU): every matrix is stored transposed, [in, out] contiguous (MKL's GEMM at 8-48
    rows is 10-25% faster on it than on the [out, in] weight that F.linear transposes), Q/K/V and
    gate/up projections are fused into one matrix each (fewer, larger matmuls), the attention scale
    1/sqrt(head_dim) is folded into the query columns (RoPE is linear, so the scores are the same),
    and each RMSNorm's weight is folded into the rows of the matrix it feeds
    (W @ (w * n(x)) = (W diag(w)) @ n(x)), so a norm is a row scale only. Same math as
    models.layers; only last-bit rounding differs."""

    def __init__(self, layer, fuse: bool):
        a, mlp = layer.self_attn, layer.mlp
        self.H, self.kvh, self.hd = a.n_heads, a.n_kv, a.hd
        self.n1, self.n2 = layer.input_layernorm, layer.post_attention_layernorm
        self.fused = fuse
        self.q_scale = 1.0 if fuse else self.hd**-0.5  # left to apply to the scores
        if fuse:
            t = lambda w: w.detach().t().contiguous()
            wq = a.q_proj.weight * self.hd**-0.5
            w1, w2 = self.n1.weight, self.n2.weight
            self.wqkv = t(torch.cat([wq, a.k_proj.weight, a.v_proj.weight]) * w1)
            self.wgu = t(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * w2)
            self.wo, self.wd = t(a.o_proj.weight), t(mlp.down_proj.weight)
            nq, nk = self.H * self.hd, self.kvh * self.hd
            self.wq = self.wqkv[:, :nq]  # column slices are views: partial projections under KV sharing
            self.wk, self.wv = self.wqkv[:, nq : nq + nk], self.wqkv[:, nq + nk :]
        else:
            self.wq, self.wk, self.wv = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
            self.wg, self.wu = mlp.gate_proj.weight, mlp.up_proj.weight
            self.wo, self.wd = a.o_proj.weight, mlp.down_proj.weight

    def extra_bytes(self) -> int:
        copies = (self.wqkv, self.wgu, self.wo, self.wd) if self.fused else ()
        return sum(t.numel() * t.element_size() for t in copies)

    def linear(self, h: Tensor, w: Tensor) -> Tensor:
        """h @ W.T for one of this layer's matrices (fused: stored as W.T)."""
        return h @ w if self.fused else F.linear(h, w)

    def norm(self, m, x: Tensor) -> Tensor:
        """RMSNorm m; fused: its weight is in the next matrix. (Fewer kernels than m(x): on a GPU a
        decode step's time is mostly kernel launches.)"""
        s = rms_scale(x, m.eps)
        return s if self.fused else s * m.weight

    def residual(self, x: Tensor, h: Tensor, w: Tensor) -> Tensor:
        """x + h @ W.T for x, h [n, *]; fused: one addmm (the add inside the GEMM)."""
        return torch.addmm(x, h, w) if self.fused else x + F.linear(h, w)

    def mlp(self, x: Tensor) -> Tensor:
        """x + MLP(norm(x))."""
        h = self.norm(self.n2, x)
        if self.fused:
            g, u = (h @ self.wgu).chunk(2, -1)
        else:
            g, u = F.linear(h, self.wg), F.linear(h, self.wu)
        return self.residual(x, F.silu(g) * u, self.wd)


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """models.layers.RMSNorm without its weight (folded into the matrix that follows): the row
    scale, computed in fp32, in 5 small kernels (F.rms_norm takes about 10 on CPU)."""
    xf = x.float()
    s = torch.linalg.vecdot(xf, xf).mul_(1.0 / x.shape[-1]).add_(eps).rsqrt_()
    return (xf * s.unsqueeze(-1)).to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """models.layers.apply_rope in 3 kernels: rotate_half(x) * sin equals roll(x, hd/2) * sin_signed
    with sin_signed = cat(-sin[:hd/2], sin[hd/2:]) (same math; addcmul may round differently)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Attention of a few queries per row, q [m, kvh, g, hd] over k, v [m, kvh, L, hd], with an
    additive bias mask [m, 1, 1, L]. On CPU: two matmuls and a softmax (2-3x faster than SDPA's CPU
    kernel, whose tiling is built for long query blocks: 0.15 vs 0.34 ms at 32 rows x 100 keys,
    d 256); elsewhere SDPA (flash / efficient kernels)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = q @ k.transpose(-1, -2)
    if scale != 1.0:
        s = s.mul_(scale)
    if mask is not None:
        s = s.add_(mask)
    # the softmax in at least fp32 (as SDPA's kernels do for bf16)
    return torch.softmax(s, -1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype) @ v


def decode_layer(
    fl: FastLayer,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    kb: Tensor,
    vb: Tensor,
    widx: Tensor,
    n_proj: int,
    segs: list[_Seg],
) -> Tensor:
    """Block.forward for n single-token items x [n, d] (same weights and math as models.layers).

    The first `n_proj` items project K/V and write them at flat (row, kv head, column) indices
    `widx` of kb/vb viewed as [-1, head_dim] (the others reuse shared K/V: no projection);
    attention reads per `segs`. cos/sin: RoPE of each item's position, [n, 1, head_dim] (sin
    signed as `rope()` wants it)."""
    n, H, kvh, hd = x.shape[0], fl.H, fl.kvh, fl.hd
    h = fl.norm(fl.n1, x)
    if n_proj == n and fl.fused:
        qkv = (h @ fl.wqkv).view(n, H + 2 * kvh, hd)
        qk = rope(qkv[:, : H + kvh], cos, sin)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + kvh :]
    else:
        q = rope(fl.linear(h, fl.wq).view(n, H, hd), cos, sin)
        if n_proj:
            hp = h[:n_proj]
            k = rope(fl.linear(hp, fl.wk).view(n_proj, kvh, hd), cos[:n_proj], sin[:n_proj])
            v = fl.linear(hp, fl.wv).view(n_proj, kvh, hd)
    if n_proj:
        kb.view(-1, hd).index_copy_(0, widx, k.reshape(-1, hd).to(kb.dtype))
        vb.view(-1, hd).index_copy_(0, widx, v.reshape(-1, hd).to(vb.dtype))
    q = q.unsqueeze(2)  # [n, H, 1, hd]
    outs = []
    for sg in segs:
        qs = q if len(segs) == 1 else q[sg.a : sg.b]
        if sg.gather is not None:
            ks = kb.view(-1, hd).index_select(0, sg.gather).view(-1, kvh, sg.L, hd)
            vs = vb.view(-1, hd).index_select(0, sg.gather).view(-1, kvh, sg.L, hd)
        else:
            cols = slice(sg.c0, sg.c0 + sg.L)
            span = slice(sg.r0, sg.r0 + sg.rows)
            ks, vs = kb[span, :, cols], vb[span, :, cols]
            if sg.sidx is not None:
                qs = q.new_zeros(sg.rows, H, 1, hd).index_copy_(0, sg.sidx, qs)
        # grouped-query attention without repeating K/V: a kv head's H/kvh query heads form one query
        # block. reshape, not view: CUDA's kernels return the block [m, kvh, H/kvh, hd] strided
        m = qs.shape[0]
        o = attend(qs.view(m, kvh, H // kvh, hd), ks.to(q.dtype), vs.to(q.dtype), sg.mask, fl.q_scale)
        o = o.reshape(m, H, 1, hd)
        outs.append(o if sg.sidx is None else o.index_select(0, sg.sidx))
    o = outs[0] if len(outs) == 1 else torch.cat(outs)
    x = fl.residual(x, o.reshape(n, H * hd), fl.wo)
    return fl.mlp(x)


# -- common machinery ----------------------------------------------------------------------------


class DecodeEngine:
    """Base: buffers, sampling, request bookkeeping. Subclasses implement `_serve`."""

    def __init__(
        self,
        model,
        batch_size: int,
        max_len: int,
        temperature: float = 0.0,
        seed: int = 0,
        fuse: bool | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        time_layers: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if max_len > model.cfg.max_seq_len:
            raise ConfigError(f"decode max_len={max_len} exceeds model.max_seq_len={model.cfg.max_seq_len}")
        if temperature < 0:
            raise ConfigError(f"temperature={temperature} must be >= 0 (0: greedy)")
        if compile and cuda_graphs:
            raise ConfigError(
                "bench.compile and bench.cuda_graphs: choose one (the graphs capture the eager layers)"
            )
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype  # caches in the weights' dtype
        self.cfg = model.cfg
        self.B, self.max_len = batch_size, max_len
        self.temperature, self.seed = temperature, seed
        self.layer_fn = decode_layer
        if compile:
            # one graph per mix of 0/1-sized dims, buffer shapes and K/V projection mode: more than
            # dynamo's default of 8 per function over a sweep of batch sizes (warm-up compiles them)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # no "duck sizing": dims that happen to be equal at the first call (items = batch rows =
            # a bias's row stride) would be assumed equal, and every later mismatch recompiled
            # (6 graphs -> 2 for a 2-layer vanilla engine; each costs seconds to a minute)
            import torch.fx.experimental._config as fx_config

            fx_config.use_duck_shape = False
            self.layer_fn = torch.compile(decode_layer, dynamic=True)
        if time_layers:  # stats["layer_s"]: wall time inside the layer calls
            if self.device.type != "cpu":
                raise ConfigError("time_layers needs a CPU engine (its ops finish before a call returns)")
            self.layer_fn = self._timed(self.layer_fn)
        # compiled: every read is one gather (one attention call per layer, shapes vary only in
        # items and keys), so the layer compiles to a couple of graphs instead of one per mix of
        # read modes and segment counts (which would exhaust dynamo's recompile limit)
        self.gather_only = compile
        # cuda_graphs: each step's layer stack (vanilla) or shared-block pass (MoR) is one CUDA graph
        # replay (GPU launches cost more than these small layers); its items padded to the batch,
        # one extra cache row (`pad_row`) taking the padding's writes. Off CUDA: the same padded
        # steps, uncaptured. Sampled tokens differ from an unpadded run (the padding draws too).
        self.graphs = cuda_graphs
        self.capture = cuda_graphs and self.device.type == "cuda"
        cos, sin = model.rotary.cos.to(self.dtype), model.rotary.sin.to(self.dtype)
        half = sin.shape[-1] // 2
        # one [positions, 2, head_dim] table: an item's cos and signed sin in one index_select
        self.rope_table = torch.stack([cos, torch.cat([-sin[:, :half], sin[:, half:]], -1)], 1)
        # fused, transposed matrices cut per-call cost (default on CPU; on GPU they would
        # add a weight copy to the measured memory for little gain)
        self.fuse = self.device.type == "cpu" if fuse is None else fuse
        self.fast = {id(m): FastLayer(m, self.fuse) for m in model.layers}
        if self.fuse:  # the final norm's weight folded into the LM head (a copy, stored [d, vocab])
            head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
            self.w_head = (head * model.norm.weight).detach().t().contiguous()
        self.stats: dict = {}

    def _timed(self, fn):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.stats["layer_s"] += time.perf_counter() - t0
            return out

        return call

    def _state(self, *shape: int, dtype: torch.dtype | None = None, fill=torch.zeros) -> Tensor:
        """Zeros (or `fill`) for the engine's mutable state (caches, in-flight hidden states), made
        as inference tensors like everything `run()` makes: a compiled layer then sees one kind of
        tensor (a cache widened inside `run()` would otherwise be a second graph)."""
        with torch.inference_mode():
            return fill(shape, dtype=dtype or self.dtype, device=self.device)

    def _buf(self, rows: int, cols: int | None = None) -> tuple[Tensor, Tensor]:
        shape = (rows, self.cfg.n_kv_heads, cols or self.max_len, self.cfg.head_dim)
        return self._state(*shape), self._state(*shape)

    @property
    def entry_bytes(self) -> int:
        """K+V bytes of one cached token in one attention buffer."""
        return 2 * self.cfg.n_kv_heads * self.cfg.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def kv_bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.buffers for t in pair)

    def extra_weight_bytes(self) -> int:
        head = self.w_head.numel() * self.w_head.element_size() if self.fuse else 0
        return head + sum(f.extra_bytes() for f in self.fast.values())

    def _widx(self, rows: np.ndarray, cols: np.ndarray, width: int | None = None) -> np.ndarray:
        """Flat [-1, head_dim] indices of (row, every kv head, col) in a [rows, n_kv, width, hd]
        buffer (width: max_len by default)."""
        kvh, width = self.cfg.n_kv_heads, width or self.max_len
        return ((rows[:, None] * kvh + _arange(kvh)) * width + cols[:, None]).reshape(-1)

    def _read(
        self, pack, a, b, slab, rows, counts, width, c0: int | np.ndarray = 0, graphed: bool = False
    ) -> _Seg:
        """`_seg` for this engine's buffers; always a gather when compiled (`gather_only`); when
        `graphed` (a stage captured as CUDA graphs: its keys padded to a multiple of GRAPH_KEYS) an
        in-place read of every row or a gather."""
        if not isinstance(c0, np.ndarray) and (
            self.gather_only or (graphed and _seg_kind(slab, rows) != "identity")
        ):
            c0 = np.full(len(rows), c0, dtype=np.int64)
        bucket = GRAPH_KEYS if graphed else 1
        return _seg(pack, a, b, slab, rows, counts, width, self.cfg.n_kv_heads, c0, bucket)

    def _graphed(self, stack, width: int) -> None:
        """`stack(x, cos, sin, widx, n_proj, segs)` over one read's tensors (a gather, or in place
        over every row without one), as CUDA graphs; `width`: the columns of the buffers it reads."""

        def fn(x, cos, sin, widx, mask, gather=None):
            seg = _Seg(0, x.shape[0], x.shape[0], mask.shape[-1], gather=gather, mask=mask)
            return stack(x, cos, sin, widx, x.shape[0], [seg])

        old = getattr(self, "stage_graphs", None)  # widened caches: captured anew
        self.stage_graphs, self.graph_width = _Graphs(fn, self.capture), width
        self.stage_graphs.captures = old.captures if old else 0

    @torch.inference_mode()  # it writes the (inference-tensor) caches' pad row
    def capture_graphs(self) -> None:
        """cuda_graphs: run (on CUDA: capture) every key count's graph up front, on inputs that are
        all padding (they read and write only the pad row), so that none is captured while timed."""
        m, kvh = self.B, self.cfg.n_kv_heads
        rows = np.full(m, self.pad_row, dtype=np.int64)
        widx = torch.as_tensor(
            self._widx(rows, np.zeros(m, dtype=np.int64), self.graph_width), device=self.device
        )
        x = torch.zeros(m, self.cfg.d_model, dtype=self.dtype, device=self.device)
        cos, sin = self._rope(torch.zeros(m, dtype=torch.long, device=self.device))
        for L in range(GRAPH_KEYS, _aligned_to(self.max_len, GRAPH_KEYS) + 1, GRAPH_KEYS):
            gather = widx.view(m, kvh, 1).expand(m, kvh, L).reshape(-1)  # column 0, L times
            mask = torch.zeros(m, 1, 1, L, dtype=self.dtype, device=self.device)
            self.stage_graphs(x, cos, sin, widx, mask, gather)
            if self.in_place_graphs:  # every row read in place (their outputs are dropped)
                self.stage_graphs(x, cos, sin, widx, mask)

    def _upload(self, pack: _Pack, segs: list[_Seg]) -> list[Tensor]:
        """One stage's host arrays to the device; the segments' indices and biases resolved."""
        parts = pack.upload(self.device, self.dtype)
        for sg in segs:
            sg.resolve(parts, pack)
        return parts

    def _rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        cs = self.rope_table.index_select(0, pos)
        return cs[:, :1], cs[:, 1:]

    def _sample(self, logits: Tensor) -> Tensor:
        if self.temperature <= 0:
            return logits.argmax(-1)
        # inverse-CDF sampling: one uniform per row (torch.multinomial is ~10x slower on CPU)
        cdf = torch.softmax(logits.float() / self.temperature, -1).cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, generator=self.gen, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max_(cdf.shape[-1] - 1)

    def _logits(self, x: Tensor) -> Tensor:
        """Final norm + LM head."""
        if self.fuse:
            return rms_scale(x, self.model.norm.eps) @ self.w_head
        return self.model.logits(self.model.norm(x))

    def _emit(self, logits: Tensor, req: Tensor, k: Tensor) -> Tensor:
        """Sample, and record token k of each request (steps that generate nothing write the dummy row)."""
        tok = self._sample(logits)
        self.out.index_put_((req, k), tok)
        if self.keep_logits:
            self.logits_out.index_put_((req, k), logits.double())
        return tok

    @torch.inference_mode()  # not no_grad: no view or version tracking (MoR's many small ops: -4%)
    def run(self, requests: list[Request], keep_logits: bool = False) -> list[Result]:
        """Serve `requests` FIFO; returns one Result per request, in request order.

        keep_logits: also return each generated position's logits (Result.logits, [new, vocab]; tests)."""
        for i, r in enumerate(requests):
            if len(r.prompt_ids) < 1 or r.max_new_tokens < 1:
                raise ConfigError(f"request {i}: needs >= 1 prompt token and max_new_tokens >= 1")
            need = len(r.prompt_ids) + r.max_new_tokens - 1
            if need > self.max_len:
                raise ConfigError(
                    f"request {i} needs {need} cached tokens (prompt {len(r.prompt_ids)} + "
                    f"{r.max_new_tokens} new - 1) > engine max_len={self.max_len}"
                )
        if self.capture and not self.stage_graphs.graphs:
            self.capture_graphs()
        self.gen = torch.Generator(device=self.device).manual_seed(self.seed)
        n_new = max((r.max_new_tokens for r in requests), default=1)
        # one extra (dummy) row takes the writes of steps that generate nothing (prompt tokens)
        self.out = torch.full((len(requests) + 1, n_new), -1, dtype=torch.long, device=self.device)
        self.keep_logits = keep_logits
        if keep_logits:
            shape = (len(requests) + 1, n_new, self.cfg.vocab_size)
            self.logits_out = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.reqs = requests
        self.req_stats = [dict() for _ in requests]
        self.stats = {"steps": 0, "tokens_fed": 0, "tokens_generated": 0, "kv_bytes_used": 0, "layer_s": 0.0}
        self.calls: Counter[int] = Counter()  # layer calls by the number of tokens in them
        t0 = time.perf_counter()
        self._serve()
        out = _to_host(self.out)
        self.stats["wall_s"] = time.perf_counter() - t0
        self.stats["kv_bytes_per_token"] = self.stats["kv_bytes_used"] / max(1, self.stats["tokens_fed"])
        self.stats["layer_calls_by_tokens"] = dict(sorted(self.calls.items()))
        return [
            Result(
                tokens=out[i][: r.max_new_tokens],
                stats=self.req_stats[i],
                logits=self.logits_out[i, : r.max_new_tokens].cpu() if keep_logits else None,
            )
            for i, r in enumerate(requests)
        ]

    def _finish(self, i: int, fed: int, kv_entries: int, extra: dict | None = None) -> None:
        """Book-keeping when request i is done: fed tokens, cache entries it held."""
        kv = kv_entries * self.entry_bytes
        self.stats["kv_bytes_used"] += kv
        st = self.req_stats[i]
        st.update(
            finished_step=self.stats["steps"],
            latency_s=time.perf_counter() - st["t_admit"],
            tokens_fed=fed,
            kv_bytes_per_token=kv / fed,
            **(extra or {}),
        )
        st.pop("t_admit")

    def _admit(self, i: int) -> None:
        self.req_stats[i].update(admitted_step=self.stats["steps"], t_admit=time.perf_counter())

    def _serve(self) -> None:
        raise NotImplementedError


# -- vanilla and recursive: continuous sequence-wise batching ------------------------------------


class SequenceEngine(DecodeEngine):
    """Every token visits every effective layer; rows are refilled as soon as their request ends."""

    def __init__(self, model, batch_size: int, max_len: int, **kw):
        super().__init__(model, batch_size, max_len, **kw)
        plan = model.plan
        self.slots = [
            (self.fast[id(model.layers[model.schedule[s]])], src, src == s)
            for s, src in enumerate(plan.source)
        ]
        owners = sorted(set(plan.source))
        self.pad_row = batch_size  # cuda_graphs: the padding's cache row
        # cuda_graphs: as many columns as the largest key bucket (it may read them in place)
        self.cols = _aligned_to(max_len, GRAPH_KEYS) if self.graphs else max_len
        self.in_place_graphs = True  # a full batch of rows reads in place, as uncaptured
        self.buffers = [self._buf(batch_size + self.graphs, self.cols) for _ in owners]
        self.buf_of = {s: self.buffers[i] for i, s in enumerate(owners)}
        self.last = self._state(batch_size + 1, dtype=torch.long)
        if self.graphs:
            self._graphed(self._stack, self.cols)

    def _stack(self, x, cos, sin, widx, n_proj, segs) -> Tensor:
        """Every effective layer (projecting K/V where the layer owns its cache)."""
        for layer, src, project in self.slots:
            kb, vb = self.buf_of[src]
            x = self.layer_fn(layer, x, cos, sin, kb, vb, widx, n_proj if project else 0, segs)
        return x

    def _serve(self) -> None:
        B, reqs, st = self.B, self.reqs, self.stats
        plen = np.array([len(r.prompt_ids) for r in reqs], dtype=np.int64)
        max_new = np.array([r.max_new_tokens for r in reqs], dtype=np.int64)
        waiting = deque(range(len(reqs)))
        req = np.full(B, -1)
        fed = np.zeros(B, dtype=np.int64)  # tokens fed so far = position of the next one
        ngen = np.zeros(B, dtype=np.int64)
        n_own = len(self.buffers)

        def admit(row: int) -> None:
            if waiting:
                req[row] = waiting.popleft()
                fed[row] = ngen[row] = 0
                self._admit(int(req[row]))
            else:
                req[row] = -1

        for row in range(B):
            admit(row)
        while (req >= 0).any():
            rows = np.flatnonzero(req >= 0)
            n = len(rows)
            ri = req[rows]
            pos = fed[rows]
            in_prompt = pos < plen[ri]
            ptok = np.zeros(n, dtype=np.int64)
            for k in np.flatnonzero(in_prompt).tolist():
                ptok[k] = reqs[ri[k]].prompt_ids[pos[k]]
            produces = pos >= plen[ri] - 1  # this step's output is a generated token
            oreq = np.where(produces, ri, len(reqs))  # others: dummy row
            ok = np.where(produces, ngen[rows], 0)
            m = B if self.graphs else n  # cuda_graphs: padded to the batch (the pad row)
            if m > n:
                rows_p, pos_p = _pad(rows, m, self.pad_row), _pad(pos, m, 0)
                ptok, in_prompt = _pad(ptok, m, 0), _pad(in_prompt, m, True)
                oreq, ok = _pad(oreq, m, len(reqs)), _pad(ok, m, 0)
            else:
                rows_p, pos_p = rows, pos
            pack = _Pack()
            ix = [pack.put(v) for v in (rows_p, pos_p, ptok, in_prompt, oreq, ok)]
            ix.append(pack.put(self._widx(rows_p, pos_p, self.cols)))
            seg = self._read(pack, 0, m, B, rows_p, pos_p + 1, self.cols, graphed=self.graphs)
            parts = self._upload(pack, [seg])
            rows_t, pos_t, ptok_t, inp_t, oreq_t, ok_t, widx = (parts[i] for i in ix)
            cos, sin = self._rope(pos_t)
            x = self.model.embed_tokens(torch.where(inp_t.bool(), ptok_t, self.last[rows_t]))
            if self.graphs:
                read = () if seg.gather is None else (seg.gather,)  # in place, or a gather
                x = self.stage_graphs(x, cos, sin, widx, seg.mask, *read)
            else:
                x = self._stack(x, cos, sin, widx, n, [seg])
            self.calls[m] += len(self.slots)
            tok = self._emit(self._logits(x), oreq_t, ok_t)
            self.last.index_copy_(0, rows_t, tok)
            # host: advance, finish, refill
            st["steps"] += 1
            st["tokens_fed"] += n
            st["tokens_generated"] += int(produces.sum())
            fed[rows] += 1
            ngen[rows] += produces
            for row in rows[produces & (ngen[rows] == max_new[ri])].tolist():
                self._finish(int(req[row]), int(fed[row]), int(fed[row]) * n_own)
                admit(row)
        st["batch_size"] = B


# -- MoR: continuous depth-wise batching -----------------------------------------------------------


class DepthWiseEngine(DecodeEngine):
    """See the module docstring. `seq_slots` sequences are in flight (KV rows; default batch_size),
    the block takes up to `batch_size` items per step, and finished items are flushed through the
    last layer/head/embedding/first layer once `flush_at` (default batch_size) have accumulated."""

    def __init__(
        self,
        model,
        batch_size: int,
        max_len: int,
        seq_slots: int | None = None,
        flush_at: int | None = None,
        kv_slack: float = 0.25,
        **kw,
    ):
        super().__init__(model, batch_size, max_len, **kw)
        from models.routers.expert_choice import CAUSAL_RULES, ExpertChoiceRouter

        if kv_slack < 0:
            raise ConfigError(f"kv_slack={kv_slack} must be >= 0")

        if not model.causal:
            raise ConfigError(
                "model.router.inference=topk is non-causal and cannot decode; "
                f"use one of {', '.join(CAUSAL_RULES)}"
            )
        self.S = seq_slots or batch_size
        if self.S < 1:
            raise ConfigError(f"seq_slots={seq_slots} must be >= 1")
        self.F = max(1, min(flush_at or batch_size, self.S))
        self.router = model.router
        self.expert = self.router.kind == "expert"
        self.rule = self.router.active_rule() if self.expert else "token_choice"
        # the engine decides with score/threshold/gate (expert) or plan (token); routers whose
        # select() does more (mod: no hierarchy, act: accumulated halting) say so (Router.engine_exact)
        self.routing_exact = self.router.engine_exact
        if not self.routing_exact:
            log.warning(
                "%s: the decode engine serves it approximately (hierarchical exits by score and "
                "threshold); model.generate follows it exactly",
                type(self.router).__name__,
            )
        self.N = self.cfg.num_recursions
        self.share = self.cfg.kv == "share"
        layers, sched = model.layers, model.schedule
        self.pre = [self.fast[id(layers[sched[s]])] for s in model.slots_pre]
        self.post = [self.fast[id(layers[sched[s]])] for s in model.slots_post]
        self.block = [self.fast[id(layers[sched[s]])] for s in model.slots_rec[0]]
        for r in range(self.N):  # cycle sharing: recursion r applies the same layers
            assert [sched[s] for s in model.slots_rec[r]] == [sched[s] for s in model.slots_rec[0]]
        self.R = 1 if self.share else self.N  # recursion regions per block-layer buffer
        # region r holds up to W[r] entries per slot: capacity share x max_len x (1 + kv_slack),
        # grown (copied into a wider buffer) if a sequence's tokens go deeper than that
        caps = model.depth_fractions()
        self._set_widths(
            [max_len]
            + [min(max_len, max(1, math.ceil(caps[r] * max_len * (1 + kv_slack)))) for r in range(1, self.R)]
        )
        self.pad_row = self.S  # cuda_graphs: the padding's row of the block's caches and states
        self.in_place_graphs = False  # a block pass always gathers (its items: a subset of the rows)
        self.rows = self.S + self.graphs
        self.pre_buf = [self._buf(self.S) for _ in self.pre]
        self.post_buf = [self._buf(self.S) for _ in self.post]
        self.block_buf = [self._buf(self.rows, self.width) for _ in self.block]
        self.buffers = self.pre_buf + self.post_buf + self.block_buf
        if self.graphs:
            self._graphed(self._block_stack, self.width)
        d = self.cfg.d_model
        self.X = self._state(self.rows, d)  # in-flight hidden state
        self.G = self._state(self.rows)  # gate of the next recursion
        self.H1 = self._state(self.rows, d)  # token-choice: h_1
        if self.expert:
            thr = self.router.threshold.tolist()
            # recursion r's decision is known without looking (threshold -inf: everyone continues)
            self.known = [self.rule == "threshold" and math.isinf(t) and t < 0 for t in thr]
        else:
            self.known = [True] * self.N
        self.known_np = np.array(self.known)
        # the stock linear expert-choice scorers, stacked: all recursions' scores in one matmul
        self.stacked = None
        if (
            self.expert
            and self.rule == "threshold"
            and type(self.router).score is ExpertChoiceRouter.score
            and all(isinstance(sc, torch.nn.Linear) and sc.bias is None for sc in self.router.scorers)
        ):
            self.stacked = torch.cat([sc.weight for sc in self.router.scorers]).detach()

    def _set_widths(self, widths: list[int]) -> None:
        """Region widths W; column offset of each region (`off`); total columns `width`."""
        self.W = widths
        self.off = np.cumsum([0, *widths[:-1]])
        self.width = sum(widths)

    def _grow(self, r: int, need: int) -> None:
        """Widen region r to at least `need` columns (x1.5 steps), copying every region over."""
        old_w, old_off = self.W, self.off.tolist()
        widths = list(old_w)
        widths[r] = min(self.max_len, max(need, math.ceil(old_w[r] * 1.5)))
        self._set_widths(widths)
        new_off = self.off.tolist()

        def widened(old: Tensor) -> Tensor:
            # not zeros: the copy writes every column but region r's new ones, which are zeroed (an
            # in-place read sees them masked, so they must be finite). Zeroing all of it first
            # doubled the page faults of fresh memory: 50-300 ms a widening, measured, CPU
            new = self._state(*old.shape[:2], self.width, old.shape[3], fill=torch.empty)
            for q in range(self.R):
                new[:, :, new_off[q] : new_off[q] + old_w[q]] = old[:, :, old_off[q] : old_off[q] + old_w[q]]
            new[:, :, new_off[r] + old_w[r] : new_off[r] + widths[r]] = 0
            return new

        self.block_buf = [(widened(kb), widened(vb)) for kb, vb in self.block_buf]
        self.buffers = self.pre_buf + self.post_buf + self.block_buf
        if self.graphs:  # captured with the old buffers
            self._graphed(self._block_stack, self.width)
        self.stats["kv_grows"] = self.stats.get("kv_grows", 0) + 1

    # -- device work ---------------------------------------------------------------------------------
    def _decide(self, x: Tensor, r: int) -> tuple[Tensor, Tensor]:
        """Expert-choice at recursion r on hidden states x [n, d]: (gate, continue?)."""
        logits = self.router.score(x.unsqueeze(1), r).squeeze(1)
        if self.rule == "aux_router":
            go = self.router.aux_scorers[r](x).squeeze(-1) > 0
        else:
            go = logits > self.router.threshold[r]
        return self.router.gate(logits).to(self.G.dtype), go

    def _edge(self, a: list[Tensor], e: list[Tensor], seg_a: _Seg | None, seg_e: _Seg | None):
        """Last layers + head + sampling for the exited rows a; embedding + first layers for rows e.

        a = (rows, pos, out request, out index, write index), e = (rows, pos, token source, prompt
        tokens, write index); the token source indexes cat(sampled tokens, prompt tokens). Returns
        the entry decisions the host cannot know (None if it knows them)."""
        m = self.model
        toks = e[3]
        na, ne = len(a[0]), len(e[0])
        if na:
            a_rows, a_pos = a[0], a[1]
            x = self.X.index_select(0, a_rows)
            if not self.expert:  # token-choice output: h_1 + g * Block^d(h_1)
                x = torch.addcmul(self.H1.index_select(0, a_rows), self.G.index_select(0, a_rows)[:, None], x)
            if self.post:
                cos, sin = self._rope(a_pos)
                for layer, (kb, vb) in zip(self.post, self.post_buf, strict=True):
                    x = self.layer_fn(layer, x, cos, sin, kb, vb, a[4], na, [seg_a])
                self.calls[na] += len(self.post)
            tok = self._emit(self._logits(x), a[2], a[3])
            toks = torch.cat([tok, toks])
        if not ne:
            return None
        e_rows, e_pos = e[0], e[1]
        x = m.embed_tokens(toks[e[2]])
        if self.pre:
            cos, sin = self._rope(e_pos)
            for layer, (kb, vb) in zip(self.pre, self.pre_buf, strict=True):
                x = self.layer_fn(layer, x, cos, sin, kb, vb, e[4], ne, [seg_e])
            self.calls[ne] += len(self.pre)
        self.X.index_copy_(0, e_rows, x)
        if self.expert:
            gate, go = self._decide(x, 0)
            self.G.index_copy_(0, e_rows, gate)
            return None if self.known[0] else go
        self.H1.index_copy_(0, e_rows, x)
        choice, gate = self.router.plan(x.unsqueeze(1), {}, {})
        self.G.index_copy_(0, e_rows, gate.squeeze(1).to(self.G.dtype))
        return choice.squeeze(1)

    def _block_stack(self, x, cos, sin, widx, n_proj, segs) -> Tensor:
        for layer, (kb, vb) in zip(self.block, self.block_buf, strict=True):
            x = self.layer_fn(layer, x, cos, sin, kb, vb, widx, n_proj, segs)
        return x

    def _block(self, t: list[Tensor], n_proj: int, segs: list[_Seg], depths: list[tuple[int, int, int]], n):
        """One pass of the shared block over the n items (sorted by depth; cuda_graphs: then the
        padding).

        t = (rows, pos, write index, next recursion); depths: (r, a, b) item slices per recursion.
        Expert-choice: scores the next recursion, stores its gate, and returns continue? per item
        (None when the host knows every answer)."""
        rows, pos = t[0], t[1]
        x0 = self.X.index_select(0, rows)
        cos, sin = self._rope(pos)
        if self.graphs:
            x = self.stage_graphs(x0, cos, sin, t[2], segs[0].mask, segs[0].gather)
            rows, x0, x = rows[:n], x0[:n], x[:n]
        else:
            x = self._block_stack(x0, cos, sin, t[2], n_proj, segs)
        self.calls[len(t[0])] += len(self.block)
        if self.expert:
            x = torch.addcmul(x0, self.G.index_select(0, rows)[:, None], x)
        self.X.index_copy_(0, rows, x)
        if not self.expert or all(self.known[r + 1] for r, _, _ in depths if r + 1 < self.N):
            if self.expert:  # gates of the next recursion are still needed
                self._next_gates(x, rows, t[3], depths)
            return None
        return self._next_gates(x, rows, t[3], depths)

    def _next_gates(self, x: Tensor, rows: Tensor, nxt: Tensor, depths) -> Tensor:
        """Expert-choice at each item's next recursion (last recursion: a placeholder, unused)."""
        if self.stacked is not None:  # every scorer in one matmul, then each item's column
            logits = F.linear(x, self.stacked).gather(1, nxt[:, None]).squeeze(1)
            self.G.index_copy_(0, rows, self.router.gate(logits).to(self.G.dtype))
            return logits > self.router.threshold[nxt]
        out = []
        for r, a, b in depths:  # per-depth scorer on the contiguous slice
            gate, go = self._decide(x[a:b], min(r + 1, self.N - 1))
            self.G.index_copy_(0, rows[a:b], gate)
            out.append(go)
        return torch.cat(out)

    def _block_reads(self, pack, items, count, c0, depths) -> list[_Seg]:
        """How a block pass's items (sorted by depth) read their caches."""
        S, n = self.S, len(items)
        if self.share:  # every item reads its slot's recursion-0 region: one segment
            return [self._read(pack, 0, n, S, items, count, self.width)]
        if self.gather_only or (
            len(depths) > 1 and all(_seg_kind(S, items[i:j]) == "gather" for _, i, j in depths)
        ):  # one copy for every item, each from its recursion's region
            return [self._read(pack, 0, n, S, items, count, self.width, c0)]
        # recursion r reads region r of the slots' rows
        return [
            self._read(pack, i, j, S, items[i:j], count[i:j], self.width, int(self.off[rr]))
            for rr, i, j in depths
        ]

    # -- scheduling (host) -----------------------------------------------------------------------------
    def _serve(self) -> None:
        S, B, N, reqs, st = self.S, self.B, self.N, self.reqs, self.stats
        plen = np.array([len(r.prompt_ids) for r in reqs], dtype=np.int64)
        max_new = np.array([r.max_new_tokens for r in reqs], dtype=np.int64)
        waiting = deque(range(len(reqs)))
        req = np.full(S, -1)
        fed = np.zeros(S, dtype=np.int64)  # tokens fed (the in-flight one included)
        ngen = np.zeros(S, dtype=np.int64)
        depth = np.zeros(S, dtype=np.int64)  # recursions done by the in-flight token
        tdepth = np.zeros(S, dtype=np.int64)  # token-choice: chosen depth
        lens = np.zeros((self.R, S), dtype=np.int64)  # entries per (recursion stack, slot)
        hist = np.zeros((S, N + 1), dtype=np.int64)  # per-row exit-depth counts of the current request
        free = deque(range(S))
        block: list[int] = []  # rows in the shared block
        queue: deque[int] = deque()  # rows ready for the block
        exits: deque[int] = deque()  # rows whose token finished its recursions
        st.update(block_steps=0, edge_steps=0, block_items=0, edge_exits=0, edge_entries=0)
        dcount = np.zeros(N + 1, dtype=np.int64)
        n_pp = len(self.pre) + len(self.post)

        def finish_row(row: int) -> None:
            i = int(req[row])
            f = int(fed[row])
            entries = f * n_pp + int(lens[:, row].sum()) * len(self.block)
            dcount[:] += hist[row]
            depth_hist = (hist[row] / max(1, hist[row].sum())).tolist()
            self._finish(i, f, entries, {"depth_hist": depth_hist})
            req[row] = -1
            free.append(row)

        def exit_rows(rows: np.ndarray, d: np.ndarray) -> None:
            """Rows whose token finished its recursions at depths d (FIFO, in order) wait for the edge."""
            exits.extend(rows.tolist())
            hist[rows, d] += 1  # a row exits at most once per step (summed into dcount when done)

        while True:
            # -- edge stage --------------------------------------------------------------------------
            a: list[int] = []
            if exits and (len(exits) >= self.F or not (block or queue)):
                a = [exits.popleft() for _ in range(min(len(exits), B))]
            na = ne = 0
            entry = None
            if a or (free and waiting):
                a_arr = np.array(a, dtype=np.int64)
                a_pos = fed[a_arr] - 1  # position (= index) of the token that just finished
                ai = req[a_arr]
                gen = a_pos >= plen[ai] - 1
                out_req = np.where(gen, ai, len(reqs))  # prompt tokens write the dummy row
                out_k = np.where(gen, ngen[a_arr], 0)
                ngen[a_arr] += gen
                st["tokens_generated"] += int(gen.sum())
                done = ngen[a_arr] == max_new[ai]
                for row in a_arr[done].tolist():
                    finish_row(row)
                go_on = ~done
                e_rows = a_arr[go_on].tolist()
                e_pos = (a_pos[go_on] + 1).tolist()
                e_src = np.flatnonzero(go_on).tolist()  # the token just sampled ...
                ptoks = []
                for k in np.flatnonzero(a_pos[go_on] + 1 < plen[ai[go_on]]).tolist():  # ... or the prompt's
                    i = int(ai[go_on][k])
                    e_src[k] = len(a) + len(ptoks)
                    ptoks.append(reqs[i].prompt_ids[e_pos[k]])
                while free and waiting:
                    row = free.popleft()
                    i = waiting.popleft()
                    req[row], fed[row], ngen[row] = i, 0, 0
                    lens[:, row] = 0
                    hist[row] = 0
                    self._admit(i)
                    e_rows.append(row)
                    e_pos.append(0)
                    e_src.append(len(a) + len(ptoks))
                    ptoks.append(reqs[i].prompt_ids[0])
                na, ne = len(a), len(e_rows)
                pack = _Pack()
                e_arr, e_pos = np.array(e_rows, dtype=np.int64), np.array(e_pos, dtype=np.int64)
                ia = [pack.put(v) for v in (a_arr, a_pos, out_req, out_k, self._widx(a_arr, a_pos))]
                ie = [pack.put(v) for v in (e_arr, e_pos, e_src, ptoks, self._widx(e_arr, e_pos))]
                seg_a = (
                    self._read(pack, 0, na, S, a_arr, a_pos + 1, self.max_len) if na and self.post else None
                )
                seg_e = (
                    self._read(pack, 0, ne, S, e_arr, e_pos + 1, self.max_len) if ne and self.pre else None
                )
                parts = self._upload(pack, [sg for sg in (seg_a, seg_e) if sg is not None])
                entry = self._edge([parts[i] for i in ia], [parts[i] for i in ie], seg_a, seg_e)
                st["edge_steps"] += 1
                st["edge_exits"] += na
                st["edge_entries"] += ne
                fed[e_arr] += 1
                depth[e_arr] = 0
                st["tokens_fed"] += ne
                if entry is None or not self.expert:  # recursion 0 known to be taken: queue now
                    queue.extend(e_rows)
            # -- block stage -------------------------------------------------------------------------
            while len(block) < B and queue:
                block.append(queue.popleft())
            dec = None
            n = len(block)
            if n:
                items = np.array(block, dtype=np.int64)
                items = items[np.lexsort((items, depth[items]))]  # by depth, then slot
                r = depth[items]
                n_proj = int((r == 0).sum()) if self.share else n
                bounds = np.flatnonzero(r[1:] != r[:-1]) + 1
                starts, ends = [0, *bounds.tolist()], [*bounds.tolist(), n]
                depths = [(int(r[i]), i, j) for i, j in zip(starts, ends)]
                if self.share:
                    col = lens[0, items]
                    count = col + (r == 0)
                    c0 = 0
                    lens[0, items[r == 0]] += 1
                else:
                    col = lens[r, items]
                    for rr, i, j in depths:
                        if int(col[i:j].max()) >= self.W[rr]:
                            self._grow(rr, int(col[i:j].max()) + 1)
                    count = col + 1
                    c0 = self.off[r]  # region r starts at column off[r]
                    col = col + c0
                    lens[r, items] += 1
                pack = _Pack()
                nxt = np.minimum(r + 1, N - 1)
                if self.graphs:  # padded to the batch; every item projects (non-writers: the pad row)
                    m, pr = B, self.pad_row
                    widx = self._widx(_pad(items[:n_proj], m, pr), _pad(col[:n_proj], m, 0), self.width)
                    items_p = _pad(items, m, pr)
                    it = [pack.put(v) for v in (items_p, _pad(fed[items] - 1, m, 0), widx, nxt)]
                    c0 = _pad(np.broadcast_to(c0, (n,)), m, 0)
                    segs = [self._read(pack, 0, m, S, items_p, _pad(count, m, 1), self.width, c0, True)]
                    n_proj = m
                else:
                    widx = self._widx(items[:n_proj], col[:n_proj], self.width)
                    it = [pack.put(v) for v in (items, fed[items] - 1, widx, nxt)]
                    segs = self._block_reads(pack, items, count, c0, depths)
                parts = self._upload(pack, segs)
                dec = self._block([parts[i] for i in it], n_proj, segs, depths, n)
                st["block_steps"] += 1
                st["block_items"] += n
                depth[items] += 1
            if not (na or ne or n):
                break
            st["steps"] += 1
            # -- the one sync: routing decisions -------------------------------------------------------
            parts = [x for x in (entry, dec) if x is not None]
            host = _to_host(parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else []
            vals = np.array(host, dtype=np.int64)
            if entry is not None:
                ent, vals = vals[:ne], vals[ne:]
                if self.expert:
                    go = ent.astype(bool)
                    queue.extend(e_arr[go].tolist())
                    exit_rows(e_arr[~go], np.zeros(int((~go).sum()), dtype=np.int64))
                else:
                    tdepth[e_arr] = ent + 1  # already queued: everyone takes recursion 0
            if n:
                d = depth[items]
                stop = d >= N
                if self.expert:
                    if dec is not None:  # a known recursion is taken by everyone
                        stop |= ~(self.known_np[np.minimum(d, N - 1)] | vals.astype(bool))
                else:
                    stop |= d >= tdepth[items]
                exit_rows(items[stop], d[stop])
                block = items[~stop].tolist()
        st["depth_counts"] = dcount.tolist()
        st.update(batch_size=B, seq_slots=S, flush_at=self.F)
