"""Paper-style tables declared as small specs; rendered to Markdown, CSV and LaTeX.

A table is one `TableSpec`: which runs (experiment patterns and a run filter), the row keys
(config-derived labels from `Results.runs`), and value `Column`s, each naming its source
(`runs`, `metrics`, `evals`, `bench`, or `derived` from other columns), a row selection, how to
collapse several matching rows, a scale and a format. `build_table` turns a spec into a DataFrame,
averaging seeds of identical setups (mean, plus `<col> std` columns when a setup has several
seeds), and checks that the runs are comparable; `render` writes name.md/.csv/.tex. Adding a
table is adding one spec to `SPECS` (or passing a spec to `build_table`).

Cell selection rules:
- evals: rows matching `where`; per (run, task, metric) the row matching the spec's
  `eval_prefer` (default: the causal inference rule, `causal: true`) wins, then the latest
  `step`; several tasks (ARC = arc_easy + arc_challenge) are combined with `agg`.
- metrics: per run the last non-null value of `field` (`agg` over steps); a glob field such as
  `router/sampling_acc_r*` averages the matching columns.
- bench: rows matching `where`; `batch_size: "max"` keeps each run's largest batch size.

The returned DataFrame carries display columns (row keys, values, stds), hidden `_`-prefixed
columns (setup keys for `join_paper`, `_n_seeds`, `_run_ids`, `_status`), and `attrs` with the
table name, title, formats and warnings (shown in the Markdown "Warnings" section and on stderr
by the CLI).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .load import FAMILY_ORDER, Results, identity_columns, size_sort_value
from .paper import run_knobs

# Keys whose difference makes runs incomparable (refused unless allow_mixed) or just suspicious.
REFUSE_KEYS = ("data.source", "data.tokenizer")
WARN_KEYS = ("data.seq_len",)


class MixedConfigError(ValueError):
    """Runs in one table differ in a key that makes their numbers incomparable."""


@dataclass
class RowKey:
    """A row-identifying column taken from `Results.runs` (`column`), shown as `label`."""

    label: str
    column: str
    optional: bool = True  # dropped when missing for every row
    when: str = "always"  # "always" | "varies": shown only when rows differ in it


@dataclass
class Column:
    """One value column; see the module docstring for the selection rules per source."""

    label: str
    source: str  # runs | metrics | evals | bench | derived
    field: str | None = None
    where: Mapping[str, Any] = dc_field(default_factory=dict)
    agg: str = "last"  # last | mean | max | min | first
    scale: float = 1.0
    fmt: str = ".2f"  # a format spec, "human" (315M, 20.0B) or "sci" (1.65e+19)
    compute: Callable[[pd.DataFrame], pd.Series] | None = None  # derived: frame of earlier columns
    paper: str | None = None  # metric or column of reference/paper.csv to compare with
    optional: bool = False  # dropped when empty for every row
    fallback: Column | None = None  # used where this column has no value
    std: bool = True  # report the std over seeds


@dataclass
class TableSpec:
    name: str
    title: str
    rows: tuple[RowKey, ...]
    columns: tuple[Column, ...]
    experiments: tuple[str, ...] = ()  # fnmatch patterns on `experiment` (default runs); empty = all runs
    run_filter: Mapping[str, Any] | Callable[[pd.DataFrame], pd.Series] | None = None
    require: tuple[str, ...] = ()  # labels of columns that must have a value for a run to appear
    eval_prefer: Mapping[str, Any] = dc_field(default_factory=lambda: {"causal": True})
    paper_tables: tuple[str, ...] = ()  # tables of reference/paper.csv that `join_paper` matches
    statuses: tuple[str, ...] = ("done", "partial")
    note: str = ""


# -- value collection ----------------------------------------------------------------------------------
def _match(df: pd.DataFrame, where: Mapping[str, Any]) -> pd.DataFrame:
    for k, v in where.items():
        if k not in df:
            return df.iloc[0:0]
        if isinstance(v, list | tuple | set | frozenset):
            df = df[df[k].isin(list(v))]
        else:
            df = df[df[k] == v]
    return df


def _agg(g, how: str) -> pd.Series:
    return (
        getattr(g, how)() if how in ("mean", "max", "min", "sum", "median", "first", "last") else g.agg(how)
    )


def _from_evals(res: Results, col: Column, prefer: Mapping[str, Any]) -> pd.Series:
    ev = res.evals
    if ev.empty or not {"task", "metric", "value"} <= set(ev.columns):
        return pd.Series(dtype=float)
    sel = _match(ev, col.where)
    if col.field is not None:
        sel = sel[sel["metric"] == col.field]
    if sel.empty:
        return pd.Series(dtype=float)
    pref = pd.Series(True, index=sel.index)
    for k, v in prefer.items():
        pref &= sel[k].eq(v) if k in sel else False
    step = pd.to_numeric(sel["step"], errors="coerce") if "step" in sel else pd.Series(0.0, index=sel.index)
    sel = sel.assign(
        _pref=pref.astype(int), _step=step.fillna(-np.inf), value=pd.to_numeric(sel["value"], errors="coerce")
    )
    sel = sel.sort_values(["_pref", "_step"], kind="stable")
    best = sel.groupby(["run_id", "task", "metric"], sort=False)["value"].last()
    return _agg(best.groupby(level="run_id"), col.agg)


def _from_metrics(res: Results, col: Column) -> pd.Series:
    m = res.metrics
    if m.empty or col.field is None:
        return pd.Series(dtype=float)
    cols = [c for c in m.columns if fnmatch.fnmatchcase(c, col.field)]
    if not cols:
        return pd.Series(dtype=float)
    m = m.sort_values("step", kind="stable") if "step" in m else m
    per = m.groupby("run_id", sort=False)[cols]
    vals = getattr(per, col.agg)() if col.agg != "last" else per.last()
    return vals.apply(pd.to_numeric, errors="coerce").mean(axis=1)


def _from_bench(res: Results, col: Column) -> pd.Series:
    b = res.bench
    if b.empty or col.field is None or col.field not in b:
        return pd.Series(dtype=float)
    where = dict(col.where)
    want_max = where.get("batch_size") == "max"
    if want_max:
        where.pop("batch_size")
    sel = _match(b, where)
    if sel.empty:
        return pd.Series(dtype=float)
    if want_max and "batch_size" in sel:
        bs = pd.to_numeric(sel["batch_size"], errors="coerce")
        sel = sel[bs == bs.groupby(sel["run_id"]).transform("max")]
    vals = pd.to_numeric(sel[col.field], errors="coerce")
    return _agg(vals.groupby(sel["run_id"], sort=False), col.agg)


def _collect(res: Results, col: Column, frame: pd.DataFrame, prefer: Mapping[str, Any]) -> pd.Series:
    if col.source == "derived":
        if col.compute is None:
            raise ValueError(f"column {col.label!r}: source 'derived' needs compute=")
        out = pd.Series(col.compute(frame), index=frame.index, dtype=float)
    else:
        if col.source == "runs":
            s = (
                pd.to_numeric(res.runs.set_index("run_id")[col.field], errors="coerce")
                if col.field in res.runs
                else pd.Series(dtype=float)
            )
        elif col.source == "evals":
            s = _from_evals(res, col, prefer)
        elif col.source == "metrics":
            s = _from_metrics(res, col)
        elif col.source == "bench":
            s = _from_bench(res, col)
        else:
            raise ValueError(
                f"column {col.label!r}: unknown source {col.source!r} "
                "(allowed: runs, metrics, evals, bench, derived)"
            )
        out = s.reindex(frame.index).astype(float) * col.scale
    if col.fallback is not None:
        out = out.fillna(_collect(res, col.fallback, frame, prefer))
    return out


# -- derived columns -------------------------------------------------------------------------------------
def mean_of(*labels: str) -> Callable[[pd.DataFrame], pd.Series]:
    """Derived column: plain mean of other columns (NaN if one is missing, like the paper's Avg)."""
    return lambda f: f[list(labels)].mean(axis=1, skipna=False)


def ratio_to_vanilla(label: str) -> Callable[[pd.DataFrame], pd.Series]:
    """Derived column: value / mean value of the vanilla runs of the same size (and bench device)."""

    def compute(f: pd.DataFrame) -> pd.Series:
        keys = [k for k in ("size_label", "_bench_device") if k in f]
        base = f[f["family"] == "vanilla"].groupby(keys, dropna=False)[label].mean()
        idx = pd.MultiIndex.from_frame(f[keys]) if len(keys) > 1 else pd.Index(f[keys[0]])
        return pd.Series(f[label].to_numpy() / base.reindex(idx).to_numpy(), index=f.index)

    return compute


# -- the specs -------------------------------------------------------------------------------------------
def _task(
    label: str, task: str | list[str], metric: str, paper: str | None, optional: bool = False
) -> Column:
    return Column(
        label,
        "evals",
        metric,
        where={"task": task},
        agg="mean",
        scale=100.0,
        fmt=".1f",
        paper=paper,
        optional=optional,
    )


PAPER_TASK_COLUMNS = (
    _task("LD", "lambada_openai", "acc", "lambada_openai"),
    _task("HS", "hellaswag", "acc_norm", "hellaswag"),
    _task("PQ", "piqa", "acc_norm", "piqa"),
    _task("WG", "winogrande", "acc", "winogrande"),
    _task("ARC", ["arc_easy", "arc_challenge"], "acc_norm", "arc"),
    _task("MMLU", "mmlu_continuation", "acc", "mmlu_continuation"),
)
AVG = Column(
    "Avg", "derived", compute=mean_of(*(c.label for c in PAPER_TASK_COLUMNS)), fmt=".1f", paper="avg"
)
# dead-token ratio (%): at evaluation when measured there, else the last training value
DEAD_PCT = Column(
    "Dead %",
    "evals",
    "dead_token_ratio",
    where={"task": "val"},
    scale=100.0,
    fmt=".1f",
    optional=True,
    fallback=Column("Dead %", "metrics", "router/dead_token_ratio", scale=100.0),
)
NLL = Column(
    "NLL",
    "evals",
    "nll",
    where={"task": "val"},
    fmt=".4f",
    paper="nll",
    fallback=Column("NLL", "metrics", "val/nll"),
)
PARAMS = Column("Params", "runs", "params_unique_nonemb", fmt="human", paper="params_nonemb", std=False)
FLOPS = Column(
    "FLOPs",
    "runs",
    "flops",
    fmt="sci",
    paper="flops",
    std=False,
    fallback=Column("FLOPs", "metrics", "flops"),
)
TOKENS = Column(
    "Tokens",
    "runs",
    "tokens",
    fmt="human",
    paper="tokens",
    std=False,
    fallback=Column("Tokens", "metrics", "tokens"),
)

SIZE = RowKey("Size", "size_label", when="varies")
BUDGET = RowKey("Budget", "budget_label", when="varies")
BUDGET_ALWAYS = RowKey("Budget", "budget_label")
SIZE_ALWAYS = RowKey("Size", "size_label")
MODEL = RowKey("Model", "label")
NR = RowKey("N_r", "N_r", optional=False)
SHARE = RowKey("Share", "sharing_label")
KV = RowKey("KV", "kv_label")


# difficulty classes of the synthetic data (harness.data.TOKEN_CLASSES; analysis never imports it)
SYNTHETIC_CLASSES = ("filler", "structure", "random", "recall", "arith")


def _router_columns() -> tuple[Column, ...]:
    """Columns of the `routers` table: compute, NLL overall and per class, depth per class, router
    health, and NLL at other recursion counts (eval.recursions) where evaluated."""
    per_class = [
        Column(f"NLL {c}", "evals", f"nll/{c}", where={"task": "val"}, fmt=".3f", optional=True)
        for c in SYNTHETIC_CLASSES
    ]
    depth = [
        Column(f"depth {c}", "evals", f"depth_mean/{c}", where={"task": "val"}, fmt=".2f", optional=True)
        for c in SYNTHETIC_CLASSES
    ]
    scaling = [
        Column(
            f"NLL @{n} rec", "evals", f"recursions/{n}/nll", where={"task": "val"}, fmt=".4f", optional=True
        )
        for n in (1, 2, 3, 4, 5, 6)
    ]
    return (
        PARAMS,
        FLOPS,
        TOKENS,
        Column(
            "FLOPs/tok spent",
            "metrics",
            "flops_per_token_measured",
            agg="mean",
            fmt="sci",
            optional=True,
            std=False,
        ),
        NLL,
        *per_class,
        Column("depth", "evals", "depth_mean/all", where={"task": "val"}, fmt=".2f", optional=True),
        *depth,
        DEAD_PCT,
        Column("Samp-Acc %", "metrics", "router/sampling_acc_r*", scale=100.0, fmt=".1f", optional=True),
        *scaling,
    )


def _spec_list() -> list[TableSpec]:
    tasks = PAPER_TASK_COLUMNS
    decode32 = Column(
        "tok/s B=32",
        "bench",
        "tokens_per_s",
        where={"probe": "decode", "batch_size": 32},
        agg="mean",
        fmt=".1f",
    )
    decode_max = Column(
        "tok/s B=max",
        "bench",
        "tokens_per_s",
        where={"probe": "decode", "batch_size": "max"},
        agg="mean",
        fmt=".1f",
    )
    return [
        TableSpec(
            "table3",
            "Table 3: MoR vs Recursive vs Vanilla at equal compute",
            rows=(SIZE, BUDGET_ALWAYS, MODEL, SHARE, KV, NR),
            columns=(PARAMS, FLOPS, TOKENS, NLL, *tasks, AVG),
            experiments=("table3*",),
            paper_tables=("table3",),
            note="Params: unique non-embedding parameters. Accuracies in %; "
            "ARC = mean of ARC-e/ARC-c acc_norm.",
        ),
        TableSpec(
            "isoflop",
            "IsoFLOP comparison (Table 9): size x budget x family",
            rows=(SIZE_ALWAYS, BUDGET_ALWAYS, MODEL, NR),
            columns=(PARAMS, TOKENS, NLL, *tasks, AVG),
            experiments=("isoflop*", "table9*", "fig3*"),
            run_filter={"budget_kind": "flops"},
            paper_tables=("table9",),
        ),
        TableSpec(
            "sharing",
            "Parameter-sharing ablation (Table 10)",
            rows=(SIZE, BUDGET, MODEL, SHARE, NR),
            columns=(PARAMS, TOKENS, NLL, *tasks, AVG),
            experiments=("sharing*", "table10*", "table11*", "fig4b*"),
            run_filter={"family": ["vanilla", "recursive"]},
            paper_tables=("table10",),
        ),
        TableSpec(
            "routing",
            "Routing ablation (Tables 13-14)",
            rows=(
                SIZE,
                BUDGET,
                MODEL,
                NR,
                RowKey("KV", "kv_label", when="varies"),
                RowKey("Arch", "model.router.arch"),
                RowKey("Func", "model.router.func"),
                RowKey("alpha", "model.router.alpha"),
                RowKey("Aux", "model.router.aux_loss"),
                RowKey("Coeff", "model.router.aux_coeff"),
                RowKey("z-loss", "model.router.z_coeff"),
                RowKey("Warmup", "model.router.capacity_warmup_steps"),
            ),
            columns=(
                replace(DEAD_PCT, paper="dead_token_ratio"),
                Column(
                    "Samp-Acc %",
                    "metrics",
                    "router/sampling_acc_r*",
                    scale=100.0,
                    fmt=".1f",
                    optional=True,
                    paper="sampling_acc",
                ),
                Column("MaxVio", "metrics", "router/maxvio", fmt=".3f", optional=True, paper="maxvio"),
                Column("Entropy", "metrics", "router/entropy", fmt=".3f", optional=True, paper="entropy"),
                NLL,
                *tasks,
                AVG,
            ),
            experiments=("routing*", "table4*", "table13*", "table14*"),
            run_filter={"family": "mor"},
            paper_tables=("table13", "table14"),  # matched on the router knobs (analysis/paper.py)
        ),
        TableSpec(
            "routers",
            "Routers at equal compute: NLL and depth per token class",
            rows=(SIZE, BUDGET, MODEL, NR, RowKey("KV", "kv_label", when="varies")),
            columns=_router_columns(),
            experiments=("routers*",),
            run_filter={"family": "mor"},
            note="Validation NLL with each router's causal inference rule. FLOPs: the training budget "
            "(the step count follows from each router's nominal depth schedule); FLOPs/tok spent: "
            "mean over training of the forward+backward FLOPs/token at the depths really routed. "
            "depth: mean recursions per token (all tokens, then per class of the predicted token). "
            "Dead %: positions no sequence of a batch routes to the last recursion. Samp-Acc: "
            "agreement of the causal rule with training-time top-k (expert-choice routers). "
            "NLL @n rec: the trained model run with n recursions (eval.recursions).",
        ),
        TableSpec(
            "kv",
            "KV-cache ablation (Table 15): recursion-wise caching vs recursive sharing",
            rows=(SIZE, BUDGET, MODEL, SHARE, NR, KV),
            columns=(
                PARAMS,
                NLL,
                Column(
                    "KV B/tok",
                    "bench",
                    "kv_bytes_per_token",
                    agg="mean",  # any probe row that reports it (decode rows carry the analytic value)
                    fmt=".0f",
                    optional=True,
                ),
                Column(
                    "KV B/tok (analytic)",
                    "bench",
                    "kv_bytes_per_token_analytic",
                    agg="mean",  # any probe row that reports it (decode rows carry the analytic value)
                    fmt=".0f",
                    optional=True,
                ),
                *tasks,
                AVG,
            ),
            experiments=("kv*", "table15*", "fig4c*"),
            paper_tables=("table15",),
        ),
        TableSpec(
            "throughput",
            "Decode throughput relative to Vanilla (Fig. 4a)",
            rows=(SIZE, BUDGET, MODEL, SHARE, KV, NR),
            columns=(
                NLL,
                decode32,
                Column(
                    "x Vanilla B=32",
                    "derived",
                    compute=ratio_to_vanilla("tok/s B=32"),
                    fmt=".2f",
                    paper="decode_speedup_b32",
                ),
                Column(
                    "Max B",
                    "bench",
                    "batch_size",
                    where={"probe": "decode", "batch_size": "max"},
                    agg="max",
                    fmt=".0f",
                    paper="max_batch",
                    std=False,
                ),
                decode_max,
                Column(
                    "x Vanilla B=max",
                    "derived",
                    compute=ratio_to_vanilla("tok/s B=max"),
                    fmt=".2f",
                    paper="decode_speedup_bmax",
                ),
            ),
            experiments=("throughput*", "fig4a*", "table3*"),
            require=("tok/s B=max",),
            paper_tables=("fig4a",),
            note="Speedups divide by the mean tokens/s of Vanilla runs of the same size; B=max is each "
            "model's largest measured decode batch.",
        ),
        TableSpec(
            "demo",
            "Demo: tiny models, every family",
            rows=(SIZE, BUDGET, MODEL, SHARE, KV, NR),
            columns=(
                PARAMS,
                Column("FLOPs/tok", "runs", "flops_per_token_paper", fmt="sci", std=False),
                TOKENS,
                NLL,
                Column(
                    "demo_mc",
                    "evals",
                    "acc",
                    where={"task": "demo_mc"},
                    scale=100.0,
                    fmt=".1f",
                    optional=True,
                ),
                Column(
                    "demo_lastword",
                    "evals",
                    "acc",
                    where={"task": "demo_lastword"},
                    scale=100.0,
                    fmt=".1f",
                    optional=True,
                ),
                Column(
                    "Decode tok/s",
                    "bench",
                    "tokens_per_s",
                    where={"probe": "decode", "batch_size": "max"},
                    agg="mean",
                    fmt=".1f",
                    optional=True,
                ),
            ),
            experiments=("demo*",),
            note=(
                "Decode tok/s at each model's largest measured batch (the mean of its probe rows "
                "there: a later probe of the run is averaged in)."
            ),
        ),
    ]


SPECS: dict[str, TableSpec] = {s.name: s for s in _spec_list()}


def register_spec(spec: TableSpec) -> TableSpec:
    """Add (or replace) a table spec by name; the CLI and notebook pick it up."""
    SPECS[spec.name] = spec
    return spec


# -- checks ----------------------------------------------------------------------------------------------
def _counts(s: pd.Series) -> str:
    vc = s.astype(object).where(s.notna(), "<unset>").astype(str).value_counts()
    return ", ".join(f"{k} ({v} run{'s' * (v != 1)})" for k, v in vc.items())


def check_comparable(runs: pd.DataFrame, table: str = "table", allow_mixed: bool = False) -> list[str]:
    """Warnings about runs that should not share a table; raises MixedConfigError on data/tokenizer mixes."""
    notes: list[str] = []
    for key in REFUSE_KEYS:
        if key in runs and runs[key].astype(object).nunique(dropna=False) > 1:
            msg = f"runs mix {key}: {_counts(runs[key])}"
            if not allow_mixed:
                raise MixedConfigError(
                    f"table {table}: {msg}. Their numbers are not comparable; select runs of one "
                    f"{key} (--experiment) or pass --allow-mixed to tabulate them anyway."
                )
            notes.append(f"INCOMPARABLE (allowed by --allow-mixed): {msg}")
    for key in WARN_KEYS:
        if key in runs and runs[key].astype(object).nunique(dropna=False) > 1:
            notes.append(f"runs differ in {key}: {_counts(runs[key])}")
    if "git_sha" in runs and runs["git_sha"].nunique(dropna=False) > 1:
        shas = runs["git_sha"].map(lambda s: str(s)[:10] if isinstance(s, str) else s)
        notes.append(f"runs come from {runs['git_sha'].nunique(dropna=False)} git SHAs: {_counts(shas)}")
    if "git_dirty" in runs and runs["git_dirty"].eq(True).any():
        notes.append(f"{int(runs['git_dirty'].eq(True).sum())} run(s) were made from a dirty worktree")
    return notes


# -- building ---------------------------------------------------------------------------------------------
def _select_runs(
    res: Results, spec: TableSpec, experiments: Iterable[str] | None
) -> tuple[Results, list[str]]:
    notes: list[str] = []
    pats = tuple(experiments) if experiments else spec.experiments
    sub = res
    if pats:
        sub = res.experiments(pats)
        if sub.runs.empty:
            notes.append(f"no runs in experiments {', '.join(pats)}; choose runs with --experiment")
    f = spec.run_filter
    if f is not None:
        if callable(f):
            mask = pd.Series(f(sub.runs), index=sub.runs.index).astype(bool)
        else:
            mask = pd.Series(True, index=sub.runs.index)
            for k, v in f.items():
                col = sub.runs[k] if k in sub.runs else pd.Series(None, index=sub.runs.index, dtype=object)
                mask &= col.isin(list(v)) if isinstance(v, list | tuple | set) else col.eq(v)
        sub = sub.select(mask)
    return sub, notes


def _fmt_value(v: Any, fmt: str, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, str):
        return v
    x = float(v)
    if fmt == "human":
        a = abs(x)
        for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if a >= div:
                s = f"{x / div:.3g}{unit}"
                break
        else:
            s = f"{x:.3g}"
        return ("+" if signed and x >= 0 else "") + s
    if fmt == "sci":
        return f"{x:+.3g}" if signed else f"{x:.3g}"
    spec = ("+" if signed else "") + fmt
    return format(x, spec)


def build_table(
    results: Results,
    spec: TableSpec | str,
    allow_mixed: bool = False,
    experiments: Iterable[str] | None = None,
) -> pd.DataFrame:
    """The table of `spec` (a TableSpec or a name in SPECS) over `results`; see the module docstring."""
    if isinstance(spec, str):
        if spec not in SPECS:
            raise KeyError(f"unknown table {spec!r}; known: {', '.join(SPECS)}")
        spec = SPECS[spec]
    res, notes = _select_runs(results, spec, experiments)
    runs = res.runs
    excluded = runs[~runs["status"].isin(spec.statuses)]
    for _, r in excluded.iterrows():
        why = (
            f": {r['failure'].splitlines()[0]}" if isinstance(r.get("failure"), str) and r["failure"] else ""
        )
        notes.append(f"excluded {r['status']} run {r['run_id']}{why}")
    runs = runs[runs["status"].isin(spec.statuses)]
    res = res.select(runs["run_id"])
    frame = runs.set_index("run_id", drop=False)
    if not res.bench.empty and "device" in res.bench:
        dev = res.bench.groupby("run_id")["device"].agg(lambda s: ",".join(sorted(set(map(str, s)))))
        frame = frame.assign(_bench_device=dev.reindex(frame.index))

    for col in spec.columns:
        frame[col.label] = _collect(res, col, frame, spec.eval_prefer)
    for label in spec.require:
        frame = frame[frame[label].notna()]
    uses_bench = any(c.source == "bench" for c in spec.columns)
    if frame.empty:
        out = pd.DataFrame(columns=[k.label for k in spec.rows] + [c.label for c in spec.columns])
        notes.append("no runs to tabulate")
        return _finish(out, spec, notes)
    notes += check_comparable(frame, spec.name, allow_mixed)
    if uses_bench and "_bench_device" in frame and frame["_bench_device"].nunique() > 1:
        notes.append(f"bench measurements come from different devices: {_counts(frame['_bench_device'])}")
    partial = frame[frame["status"] != "done"]
    if len(partial):
        notes.append(f"{len(partial)} run(s) not finished: {', '.join(partial['run_id'])}")

    # hidden setup keys (paper join) and sort keys
    frame["_family"] = frame["family"]
    frame["_router"] = frame.get("model.router.name", pd.Series(None, index=frame.index)).where(
        frame["family"].eq("mor")
    )
    frame["_kv"] = frame.get("model.kv", pd.Series(None, index=frame.index)).where(
        ~frame["family"].eq("vanilla")
    )
    frame["_sharing"] = frame.get("model.sharing", pd.Series(None, index=frame.index)).where(
        ~frame["family"].eq("vanilla")
    )
    frame["_N_r"] = frame["N_r"]
    frame["_layers"] = pd.to_numeric(
        frame.get("model.n_layers", pd.Series(None, index=frame.index, dtype=object)), errors="coerce"
    )
    frame["_knobs"] = run_knobs(frame).where(frame["family"].eq("mor"), "")
    frame["_size"] = frame["size_label"]
    frame["_budget_kind"] = frame["budget_kind"]
    frame["_budget_value"] = frame["budget_value"]
    frame["_status"] = frame["status"]

    # average seeds of identical setups
    ident = identity_columns(frame.columns, results.config_columns) or ["run_id"]
    keys = ident + ["_status"]
    values = [c.label for c in spec.columns]
    work = frame.copy()
    for c in keys:
        work[c] = work[c].map(lambda v: repr(v) if isinstance(v, list | dict) else v)
    g = work.groupby(keys, dropna=False, sort=False)
    firsts = g.first()
    means = g[values].mean()
    stds = g[values].std(ddof=1)
    n = g.size()
    out = firsts.drop(columns=[c for c in values if c in firsts]).join(means)
    out["_n_seeds"] = n
    out["_run_ids"] = g["run_id"].agg(lambda s: ";".join(s))
    out = out.copy().reset_index()  # consolidated first: wide specs (routers) would fragment it
    stds = stds.reset_index(drop=True)

    # sort: size, budget, family, router, N_r, kv, sharing
    out["_o_size"] = out["size_label"].map(size_sort_value)
    out["_o_fam"] = out["family"].map(lambda f: FAMILY_ORDER.get(f, 9))
    order = ["_o_size", "_budget_kind", "_budget_value", "_o_fam", "label", "_sharing", "_kv", "_N_r"]
    order = [c for c in order if c in out]
    idx = out.sort_values(order, kind="stable", na_position="first").index
    out, stds = out.loc[idx].reset_index(drop=True), stds.loc[idx].reset_index(drop=True)

    display: dict[str, pd.Series] = {}
    if out["experiment"].nunique(dropna=False) > 1:
        display["Experiment"] = out["experiment"]
    for k in spec.rows:
        s = out[k.column] if k.column in out else pd.Series(None, index=out.index, dtype=object)
        if k.optional and s.isna().all():
            continue
        if k.when == "varies" and s.astype(str).nunique() <= 1:
            continue
        display[k.label] = s
    # setups that would print identically: say what differs
    key_labels = list(display)
    labels_df = pd.DataFrame(display).astype(str)
    dup = labels_df.duplicated(keep=False) if key_labels else pd.Series(False, index=out.index)
    if dup.any():
        variant = pd.Series("", index=out.index)
        for _, grp in labels_df[dup].groupby(key_labels, sort=False):
            rows = out.loc[grp.index]
            diff = [c for c in ident if c in rows and rows[c].astype(str).nunique() > 1]
            setup = [c for c in diff if not c.startswith(("eval.", "bench."))]
            for i in grp.index:
                variant[i] = (
                    ", ".join(f"{c}={_short(out.at[i, c])}" for c in (setup or diff)[:4])
                    or out.at[i, "_run_ids"]
                )
        display["Variant"] = variant
    multi = bool((out["_n_seeds"] > 1).any())
    if multi:
        display["Seeds"] = out["_n_seeds"]
    if (out["_status"] != "done").any():
        display["Status"] = out["_status"]
    for c in spec.columns:
        if c.optional and out[c.label].isna().all():
            continue
        display[c.label] = out[c.label]
        if multi and c.std:
            display[f"{c.label} std"] = stds[c.label]
    hidden = [
        "_family",
        "_router",
        "_kv",
        "_sharing",
        "_N_r",
        "_layers",
        "_knobs",
        "_size",
        "_budget_kind",
        "_budget_value",
        "_status",
        "_n_seeds",
        "_run_ids",
    ]
    table = pd.DataFrame(display)
    for h in hidden:
        table[h] = out[h]
    return _finish(table, spec, notes)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _finish(table: pd.DataFrame, spec: TableSpec, notes: list[str]) -> pd.DataFrame:
    table.attrs.update(
        table=spec.name,
        title=spec.title,
        note=spec.note,
        formats={c.label: c.fmt for c in spec.columns},
        row_labels=["Experiment"] + [k.label for k in spec.rows] + ["Variant", "Seeds", "Status"],
        warnings=list(notes),
    )
    return table


def build_tables(
    results: Results,
    names: Iterable[str] | None = None,
    allow_mixed: bool = False,
    experiments: Iterable[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Several tables by name (default: every spec)."""
    return {n: build_table(results, n, allow_mixed, experiments) for n in (names or SPECS)}


# -- rendering --------------------------------------------------------------------------------------------
def format_table(table: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """Display strings: values per their format, "mean ± std" where seeds were averaged, "–" if missing."""
    fmts: dict[str, str] = table.attrs.get("formats", {})
    out: dict[str, list[str]] = {}
    pm = r" $\pm$ " if latex else " ± "
    for c in table.columns:
        if c.startswith("_") or c.endswith(" std"):
            continue
        fmt = fmts.get(c) or fmts.get(re.sub(r"^(paper|delta)_", "", c))
        signed = c.startswith("delta_")
        std = table.get(f"{c} std")
        cells = []
        for i, v in enumerate(table[c]):
            if fmt is None:
                cell = "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                if isinstance(v, float) and not math.isnan(v) and v.is_integer():
                    cell = str(int(v))
            else:
                cell = _fmt_value(v, fmt, signed)
                if std is not None and not pd.isna(std.iloc[i]) and cell != "–":
                    cell += pm + _fmt_value(std.iloc[i], fmt)
            cells.append(_tex_escape(cell) if latex else cell)
        out[_tex_escape(c) if latex else c] = cells
    return pd.DataFrame(out)


def _tex_escape(s: str) -> str:
    if r"$\pm$" in s:
        a, b = s.split(r" $\pm$ ", 1)
        return _tex_escape(a) + r" $\pm$ " + _tex_escape(b)
    rep = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
        "–": "--",
        "±": r"$\pm$",
    }
    return "".join(rep.get(ch, ch) for ch in s)


def to_markdown(table: pd.DataFrame) -> str:
    title = table.attrs.get("title") or table.attrs.get("table", "")
    parts = [f"# {title}\n"] if title else []
    if table.empty:
        parts.append("_No runs._\n")
    else:
        parts.append(format_table(table).to_markdown(index=False, disable_numparse=True) + "\n")
    notes = [table.attrs.get("note", "")]
    if (table.get("_n_seeds", pd.Series(dtype=float)) > 1).any():
        notes.append("Cells with several seeds show mean ± std (sample std).")
    notes = [n for n in notes if n]
    if notes:
        parts.append("\n" + " ".join(notes) + "\n")
    warns = table.attrs.get("warnings") or []
    if warns:
        parts.append("\n## Warnings\n\n" + "".join(f"- {w}\n" for w in warns))
    return "".join(parts)


def to_latex(table: pd.DataFrame) -> str:
    warns = table.attrs.get("warnings") or []
    head = "".join(f"% WARNING: {w}\n" for w in warns)
    if table.empty:
        return head + "% no runs\n"
    f = format_table(table, latex=True)
    row_labels = set(table.attrs.get("row_labels", []))
    align = "".join("l" if c.replace("\\_", "_") in row_labels else "r" for c in f.columns)
    body = f.to_latex(
        index=False,
        escape=False,
        column_format=align,
        caption=_tex_escape(table.attrs.get("title", "")) or None,
        label=f"tab:{table.attrs.get('table', 'table')}",
    )
    return head + body


def render(table: pd.DataFrame, out_dir: str | Path, name: str | None = None) -> dict[str, Path]:
    """Write name.md (with a Warnings section), name.csv (numbers, full precision) and name.tex."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or table.attrs.get("table", "table")
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "csv", "tex")}
    paths["md"].write_text(to_markdown(table))
    table.to_csv(paths["csv"], index=False)
    paths["tex"].write_text(to_latex(table))
    return paths
