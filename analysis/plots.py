"""Paper-style plots with seaborn; every plot is saved as PNG and PDF.

Each `plot_*` function takes a `Results` and an output directory and returns the files it wrote;
when its data is absent it writes nothing, logs a note saying why, and returns []. `make_plots`
runs several by name (`PLOTS`).

- `isoflop`: NLL vs training FLOPs per size and family (paper Fig. 3), and NLL vs unique
  non-embedding params per family with one curve per budget: a quadratic in log10(params) is
  fitted per (family, budget) and its optimum marked with a star (paper Fig. 5a style); the
  optima are also written to isoflop_optima.csv.
- `loss`: training loss vs tokens, one line per run, one panel per experiment; `loss_vs_flops`:
  the same against cumulative training FLOPs (the compute-matched view).
- `throughput`: decode tokens/s vs batch size (bench probe "decode").
- `kv_memory`: KV-cache bytes per token per model, measured and analytic (bench probe "memory").
- `router_depth`: heatmaps of the fraction of tokens reaching recursion k, by token class and by
  position. Input: eval.jsonl rows with task "val" and metric `depth_frac/<class>/r<k>`; a class
  named `pos_<start>` (or `pos<start>`) is a position bucket starting at token `<start>`. Runs
  without them fall back to one class "all" from the token counts `n` of `nll/depth<k>` rows.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .load import Results, size_sort_value  # noqa: E402
from .tables import build_table  # noqa: E402

log = logging.getLogger("analysis")
FORMATS = ("png", "pdf")
DEPTH_RE = re.compile(r"^depth_frac/([^/]+)/r(\d+)$")
POS_RE = re.compile(r"^pos[_-]?(\d+)")


def save(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Save `fig` as name.png and name.pdf under out_dir and close it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in FORMATS:
        p = out_dir / f"{name}.{ext}"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def _skip(name: str, why: str) -> list[Path]:
    log.info("plot %s skipped: %s", name, why)
    return []


def _theme() -> None:
    sns.set_theme(style="whitegrid", context="paper", palette="colorblind")


def _size_order(values: Iterable) -> list:
    return sorted(set(values), key=lambda s: (size_sort_value(s), str(s)))


def _done_runs(results: Results) -> pd.DataFrame:
    return results.runs[results.runs["status"].isin(("done", "partial"))]


# -- isoFLOP ---------------------------------------------------------------------------------------------
def fit_isoflop_optima(
    df: pd.DataFrame, x: str = "Params", y: str = "NLL", by: tuple[str, ...] = ("model", "budget")
) -> pd.DataFrame:
    """Per group, fit y = a*log10(x)^2 + b*log10(x) + c; optimum at log10(x*) = -b / 2a.

    Returns one row per group with `a, b, c, n_points, x_opt, y_opt, in_range` (x_opt NaN when fewer
    than 3 distinct x or the parabola opens downwards).
    """
    rows = []
    for key, g in df.dropna(subset=[x, y]).groupby(list(by), sort=False):
        g = g[g[x] > 0]
        lx = np.log10(g[x].to_numpy(dtype=float))
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(
            n_points=len(np.unique(lx)),
            a=math.nan,
            b=math.nan,
            c=math.nan,
            x_opt=math.nan,
            y_opt=math.nan,
            in_range=False,
        )
        if row["n_points"] >= 3:
            a, b, c = np.polyfit(lx, g[y].to_numpy(dtype=float), 2)
            row.update(a=a, b=b, c=c)
            if a > 0:
                lo = -b / (2 * a)
                row.update(
                    x_opt=10**lo,
                    y_opt=float(np.polyval([a, b, c], lo)),
                    in_range=bool(lx.min() <= lo <= lx.max()),
                )
        rows.append(row)
    return pd.DataFrame(rows)


def _model_nr(t: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [m if f == "vanilla" else f"{m}-{n}" for m, f, n in zip(t["Model"], t["_family"], t["N_r"])],
        index=t.index,
    )


def plot_isoflop(
    results: Results, out_dir: str | Path, allow_mixed: bool = False, experiments: Iterable[str] | None = None
) -> list[Path]:
    t = build_table(results, "isoflop", allow_mixed=allow_mixed, experiments=experiments)
    t = t.dropna(subset=["NLL"]) if "NLL" in t else t.iloc[0:0]
    if t.empty:
        return _skip("isoflop", "no runs with a FLOP budget and a validation NLL")
    _theme()
    t = t.assign(model=_model_nr(t), budget=t["_budget_value"].astype(float), size=t["_size"].astype(str))
    sizes = _size_order(t["size"])
    paths: list[Path] = []
    g = sns.relplot(
        data=t,
        x="budget",
        y="NLL",
        hue="model",
        style="model",
        col="size",
        col_order=sizes,
        kind="line",
        marker="o",
        markersize=6,
        height=3,
        aspect=1.0,
        facet_kws={"sharey": False},
        col_wrap=min(4, len(sizes)),
    )
    g.set(xscale="log")
    g.set_axis_labels("training FLOPs", "validation NLL")
    g.figure.suptitle("IsoFLOP: NLL vs compute per size", y=1.03)
    paths += save(g.figure, out_dir, "isoflop")

    optima = fit_isoflop_optima(t, by=("model", "budget"))
    models = list(dict.fromkeys(t["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3), squeeze=False)
    budgets = sorted(t["budget"].unique())
    palette = dict(zip(budgets, sns.color_palette("viridis", len(budgets))))
    for ax, m in zip(axes[0], models):
        sub = t[t["model"] == m]
        sns.scatterplot(
            data=sub, x="Params", y="NLL", hue="budget", palette=palette, ax=ax, legend=False, s=30
        )
        for (bud,), pts in sub.groupby(["budget"]):
            ax.plot(
                pts.sort_values("Params")["Params"],
                pts.sort_values("Params")["NLL"],
                color=palette[bud],
                alpha=0.35,
                lw=1,
            )
            fit = optima[(optima["model"] == m) & (optima["budget"] == bud)]
            if len(fit) and not math.isnan(fit["a"].iloc[0]):
                a, b, c = fit[["a", "b", "c"]].iloc[0]
                lx = np.linspace(np.log10(pts["Params"].min()), np.log10(pts["Params"].max()), 50)
                ax.plot(10**lx, np.polyval([a, b, c], lx), color=palette[bud], lw=1.5)
                if not math.isnan(fit["x_opt"].iloc[0]):
                    ax.plot(
                        fit["x_opt"].iloc[0],
                        fit["y_opt"].iloc[0],
                        marker="*",
                        ms=14,
                        color=palette[bud],
                        mec="black",
                        mew=0.6,
                        ls="none",
                    )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(m)
        ax.set_xlabel("unique non-emb. params")
        ax.set_ylabel("validation NLL")
    handles = [plt.Line2D([], [], color=palette[b], marker="o", label=f"{b:.3g} FLOPs") for b in budgets]
    handles.append(plt.Line2D([], [], color="gray", marker="*", ms=10, ls="none", label="fitted optimum"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("IsoFLOP curves: quadratic fit in log(params) per budget", y=1.03)
    fig.tight_layout()
    paths += save(fig, out_dir, "isoflop_optimum")
    csv = Path(out_dir) / "isoflop_optima.csv"
    optima.to_csv(csv, index=False)
    return [*paths, csv]


# -- training curves -------------------------------------------------------------------------------------
def plot_loss_curves(results: Results, out_dir: str | Path, x: str = "tokens") -> list[Path]:
    """Training loss vs `x` ("tokens" -> loss_curves, "flops" -> loss_vs_flops), one line per run."""
    name, label = {
        "tokens": ("loss_curves", "training tokens"),
        "flops": ("loss_vs_flops", "training FLOPs"),
    }[x]
    m = results.metrics
    if m.empty or not {"loss", x} <= set(m.columns):
        return _skip(name, f"metrics.jsonl has no loss/{x} rows")
    runs = results.runs.set_index("run_id")
    df = m[["run_id", x, "loss"]].dropna().copy()
    if df.empty:
        return _skip(name, f"metrics.jsonl has no loss/{x} rows")
    df["model"] = df["run_id"].map(runs["label_nr"]) + df["run_id"].map(runs["kv_label"]).map(
        lambda k: " (KV share)" if k == "Share" else ""
    )
    df["size"] = df["run_id"].map(runs["size_label"]).astype(str)
    df["experiment"] = df["run_id"].map(runs["experiment"]).astype(str)
    _theme()
    exps = list(dict.fromkeys(df["experiment"]))
    g = sns.relplot(
        data=df,
        x=x,
        y="loss",
        hue="model",
        style="size",
        units="run_id",
        estimator=None,
        kind="line",
        col="experiment",
        col_order=exps,
        col_wrap=min(3, len(exps)),
        height=3,
        aspect=1.2,
        facet_kws={"sharex": False, "sharey": False},
        lw=1,
    )
    g.set_axis_labels(label, "training loss")
    return save(g.figure, out_dir, name)


def plot_loss_vs_flops(results: Results, out_dir: str | Path) -> list[Path]:
    """Training loss vs cumulative training FLOPs: the compute-matched view of the loss curves."""
    return plot_loss_curves(results, out_dir, x="flops")


# -- inference probes ------------------------------------------------------------------------------------
def _bench(results: Results, probe: str) -> pd.DataFrame:
    b = results.bench
    if b.empty or "probe" not in b:
        return b.iloc[0:0]
    runs = _done_runs(results).set_index("run_id")
    b = b[(b["probe"] == probe) & b["run_id"].isin(runs.index)].copy()
    for col, src in (
        ("model", "label_nr"),
        ("size", "size_label"),
        ("kv", "kv_label"),
        ("experiment", "experiment"),
    ):
        b[col] = b["run_id"].map(runs[src]).astype(str)
    return b


def plot_throughput(results: Results, out_dir: str | Path) -> list[Path]:
    b = _bench(results, "decode")
    if b.empty or not {"batch_size", "tokens_per_s"} <= set(b.columns):
        return _skip("throughput", "no decode rows in bench.jsonl")
    b = b.dropna(subset=["batch_size", "tokens_per_s"])
    _theme()
    sizes = _size_order(b["size"])
    g = sns.relplot(
        data=b,
        x="batch_size",
        y="tokens_per_s",
        hue="model",
        style="kv",
        col="size",
        col_order=sizes,
        kind="line",
        marker="o",
        height=3,
        aspect=1.2,
        facet_kws={"sharey": False},
    )
    g.set(xscale="log")
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
    g.set_axis_labels("decode batch size", "decode tokens/s")
    return save(g.figure, out_dir, "throughput")


def plot_kv_memory(results: Results, out_dir: str | Path) -> list[Path]:
    cols = [c for c in ("kv_bytes_per_token", "kv_bytes_per_token_analytic") if c in results.bench]
    b = results.bench
    if b.empty or not cols:
        return _skip("kv_memory", "no bench.jsonl rows with kv_bytes_per_token(_analytic)")
    runs = _done_runs(results).set_index("run_id")
    b = b[b["run_id"].isin(runs.index)]
    per_run = b.groupby("run_id")[cols].mean().reset_index()  # any probe that reports the field
    for col, src in (("model", "label_nr"), ("size", "size_label"), ("kv", "kv_label")):
        per_run[col] = per_run["run_id"].map(runs[src]).astype(str)
    long = per_run.melt(
        id_vars=["run_id", "model", "size", "kv"], value_vars=cols, var_name="kind", value_name="bytes"
    ).dropna(subset=["bytes"])
    if long.empty:
        return _skip("kv_memory", "kv_bytes_per_token values are all empty")
    long["kind"] = long["kind"].map(
        {"kv_bytes_per_token": "measured", "kv_bytes_per_token_analytic": "analytic"}
    )
    long["model"] = long["model"] + long["kv"].map(lambda k: " (KV share)" if k == "Share" else "")
    _theme()
    sizes = _size_order(long["size"])
    g = sns.catplot(
        data=long,
        x="model",
        y="bytes",
        hue="kind",
        col="size",
        col_order=sizes,
        kind="bar",
        height=3,
        aspect=1.4,
        sharex=False,
        sharey=False,
        errorbar=None,
    )
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=45)
    g.set_axis_labels("", "KV cache bytes / token")
    return save(g.figure, out_dir, "kv_memory")


# -- router depth ----------------------------------------------------------------------------------------
def _depth_from_nll_counts(ev: pd.DataFrame) -> pd.DataFrame:
    """Class "all" rows from `nll/depth<k>` token counts (what harness.evaluate writes today).

    `n` of `nll/depth<k>` counts tokens that ran k recursions, so the fraction reaching recursion k
    is the share of tokens with depth >= k.
    """
    if "n" not in ev:
        return ev.iloc[0:0]
    d = ev[ev["metric"].astype(str).str.match(r"^nll/depth\d+$")].copy()
    if d.empty:
        return d
    d["depth"] = d["metric"].str.extract(r"(\d+)$")[0].astype(int)
    d["n"] = pd.to_numeric(d["n"], errors="coerce")
    rows = []
    for rid, g in d.dropna(subset=["n"]).groupby("run_id"):
        total = g["n"].sum()
        if total <= 0:
            continue
        for k in range(1, int(g["depth"].max()) + 1):
            rows.append(
                {
                    "run_id": rid,
                    "cls": "all",
                    "recursion": k,
                    "value": g.loc[g["depth"] >= k, "n"].sum() / total,
                }
            )
    return pd.DataFrame(rows)


def router_depth_frame(results: Results) -> pd.DataFrame:
    """Tidy depth fractions: run_id, model, size, cls, position (start or NaN), recursion, value.

    From eval rows `depth_frac/<class>/r<k>` (task val); runs without them but with `nll/depth<k>`
    rows (token counts per depth) contribute one class, "all".
    """
    ev = results.evals
    if ev.empty or not {"task", "metric", "value"} <= set(ev.columns):
        return pd.DataFrame()
    ev = ev[ev["task"] == "val"].copy()
    if "causal" in ev:  # prefer the causal inference rule where a run reports both
        has = ev.groupby("run_id")["causal"].transform(lambda s: s.eq(True).any())
        ev = ev[~has | ev["causal"].eq(True)]
    if "step" in ev:
        last = ev.groupby("run_id")["step"].transform("max")
        ev = ev[ev["step"].isna() | ev["step"].eq(last)]
    frac = ev[ev["metric"].astype(str).str.startswith("depth_frac/")].copy()
    parts = frac["metric"].astype(str).str.extract(DEPTH_RE)
    frac["cls"], frac["recursion"] = parts[0], pd.to_numeric(parts[1], errors="coerce")
    frac = frac.dropna(subset=["cls", "recursion"])[["run_id", "cls", "recursion", "value"]]
    counts = _depth_from_nll_counts(ev[~ev["run_id"].isin(frac["run_id"])])
    df = (
        pd.concat([x for x in (frac, counts) if not x.empty], ignore_index=True)
        if len(frac) or len(counts)
        else pd.DataFrame()
    )
    if df.empty:
        return df
    runs = results.runs.set_index("run_id")
    kv = df["run_id"].map(runs["kv_label"]).map(lambda k: " KV-share" if k == "Share" else "")
    df["model"] = df["run_id"].map(runs["label_nr"]) + kv
    df["size"] = df["run_id"].map(runs["size_label"]).astype(str)
    df["position"] = pd.to_numeric(df["cls"].astype(str).str.extract(POS_RE)[0], errors="coerce")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df[["run_id", "model", "size", "cls", "position", "recursion", "value"]].reset_index(drop=True)


def _heatmaps(df: pd.DataFrame, row: str, title: str, out_dir: str | Path, name: str) -> list[Path]:
    groups = list(df.groupby(["size", "model"], sort=True))  # model carries N_r and a KV-share mark
    n = len(groups)
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(3.2 * ncol, 0.45 * df[row].nunique() * nrow + 1.6 * nrow), squeeze=False
    )
    cmap = sns.color_palette("mako_r", as_cmap=True)
    for ax, ((size, model), g) in zip(axes.flat, groups):
        piv = g.pivot_table(index=row, columns="recursion", values="value", aggfunc="mean")
        if row == "position":
            piv.index = [f"{int(p)}+" for p in piv.index]
        piv.columns = [f"r{int(c)}" for c in piv.columns]
        # imshow + hand annotation: sns.heatmap redraws the whole figure per panel (slow with many panels)
        vals = piv.to_numpy(dtype=float)
        ax.imshow(vals, vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.grid(False)
        ax.set_xticks(range(vals.shape[1]), piv.columns)
        ax.set_yticks(range(vals.shape[0]), piv.index)
        for (i, j), v in np.ndenumerate(vals):
            if not np.isnan(v):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.6 else "black",
                )
        ax.set_title(f"{model} ({size})")
        ax.set_xlabel("recursion")
        ax.set_ylabel("token position" if row == "position" else "token class")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return save(fig, out_dir, name)


def plot_router_depth(results: Results, out_dir: str | Path) -> list[Path]:
    df = router_depth_frame(results)
    if df.empty:
        return _skip(
            "router_depth",
            "no eval rows with task 'val' and metric 'depth_frac/<class>/r<k>' or 'nll/depth<k>'",
        )
    _theme()
    paths: list[Path] = []
    cls = df[df["position"].isna()]
    pos = df[df["position"].notna()]
    if not cls.empty:
        paths += _heatmaps(
            cls,
            "cls",
            "Fraction of tokens reaching each recursion, by token class",
            out_dir,
            "router_depth_class",
        )
    else:
        _skip("router_depth_class", "no token-class depth rows")
    if not pos.empty:
        paths += _heatmaps(
            pos,
            "position",
            "Fraction of tokens reaching each recursion, by position",
            out_dir,
            "router_depth_position",
        )
    else:
        _skip("router_depth_position", "no position depth rows (class names pos_<start>)")
    return paths


PLOTS: dict[str, Callable[..., list[Path]]] = {
    "isoflop": plot_isoflop,
    "loss": plot_loss_curves,
    "loss_vs_flops": plot_loss_vs_flops,
    "throughput": plot_throughput,
    "kv_memory": plot_kv_memory,
    "router_depth": plot_router_depth,
}


def make_plots(
    results: Results,
    out_dir: str | Path,
    names: Iterable[str] | None = None,
    allow_mixed: bool = False,
    experiments: Iterable[str] | None = None,
) -> dict[str, list[Path]]:
    """Run the named plots (default: all); returns name -> files written ([] when skipped)."""
    out: dict[str, list[Path]] = {}
    for name in names or PLOTS:
        if name not in PLOTS:
            raise KeyError(f"unknown plot {name!r}; known: {', '.join(PLOTS)}")
        fn = PLOTS[name]
        if name == "isoflop":
            out[name] = fn(results, out_dir, allow_mixed=allow_mixed, experiments=experiments)
        else:
            sub = results.experiments(experiments) if experiments else results
            out[name] = fn(sub, out_dir)
    return out
