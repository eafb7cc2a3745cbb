"""The paper's numbers (reference/paper.csv) and a join that puts them next to ours.

paper.csv is tidy: one row per (paper table, setup, metric). Setup columns: `table` (table3,
table9, fig4a, table10, table13, table14, table15), `setting`, `model`, `family` (vanilla |
recursive | mor), `size` (135M, 360M, 730M, 1.7B), `layers` (N_L as printed: "30", "1+10+1"),
`sharing` (cycle | sequence | middle_cycle | middle_sequence), `N_r` (1 for vanilla), `router`
(expert_choice | token_choice | random: Table 13's random-score expert-choice control), `kv`
(cache | share), `budget_kind` (flops | tokens), `budget_value`, `params_nonemb`, `flops`, `tokens`
(blank where the table prints none); then `metric` (nll, lambada_openai, hellaswag, piqa,
winogrande, arc, mmlu_continuation, avg, decode_speedup_b32, decode_speedup_bmax, max_batch,
dead_token_ratio, sampling_acc, maxvio, entropy), `value` (accuracies, dead_token_ratio and
sampling_acc in % as printed) and `note` (derivations, and cells left out because they are unclear).
Values are quoted from shared/reference/paper.md (each table as printed; Table 3 and Table 9 differ
slightly for the same runs, so a join names the table it used).

`setting` is either a label ("isoFLOP", "fixed 20B tok", "10B tok") or knobs the setup columns do
not cover, as `key=value` pairs joined by ";" (Tables 13-15), e.g.
`func=sigmoid;alpha=0.1;aux=bce;coeff=0.001;arch=linear;warmup=0;zloss=0`. Router knobs (values as in
the harness's `model.router` config): `func` (sigmoid | tanh | softmax; none = no normalization,
rand = random scores), `alpha`, `aux` (`aux_loss`: bce | aux_router | balance | loss_free), `coeff`
(`aux_coeff`: BCE or balancing-loss weight), `u` (`bias_update_rate` of loss-free balancing), `arch`
(linear | mlp | wide_mlp), `warmup` (1 = capacity warmup, `capacity_warmup_steps` > 0) and `zloss`
(1 = router z-loss, `z_coeff` > 0). Table 15 variants the harness has no knob for: `kv_pattern` and
`kv_group` (vanilla cross-layer KV sharing), `kv_hybrid=1` (the paper's hybrid KV sharing, †).
A row with knobs matches only runs that have every knob equal (`run_knobs`); a key with no run
counterpart never matches. A "-" cell in the paper (not applicable) is no knob.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

PAPER_CSV = Path(__file__).parent / "reference" / "paper.csv"
PAPER_SIZES = {"135M": 135e6, "360M": 360e6, "730M": 730e6, "1.7B": 1.7e9}
DEFAULT_TABLES = {
    "table3": ("table3",),
    "isoflop": ("table9", "table3"),
    "throughput": ("fig4a",),
    "sharing": ("table10",),
    "routing": ("table13", "table14"),
    "kv": ("table15",),
}
SETUP_COLUMNS = ("family", "size", "sharing", "N_r", "router", "kv", "budget_kind", "budget_value")
# knob -> (model.router config key, kind): "value" as configured, "on" = 1 if > 0 else 0
RUN_KNOBS = {
    "func": ("func", "value"),
    "alpha": ("alpha", "value"),
    "aux": ("aux_loss", "value"),
    "coeff": ("aux_coeff", "value"),
    "u": ("bias_update_rate", "value"),
    "arch": ("arch", "value"),
    "warmup": ("capacity_warmup_steps", "on"),
    "zloss": ("z_coeff", "on"),
}


def load_paper(path: str | Path = PAPER_CSV) -> pd.DataFrame:
    """reference/paper.csv as a DataFrame (empty strings become NaN)."""
    df = pd.read_csv(path, dtype={"size": str, "layers": str})
    df["N_r"] = df["N_r"].astype("Int64")
    return df


def paper_size(label: Any) -> str | None:
    """Map a size preset name ("360m", "smollm-360M", "1.7b", "1700m") to the paper's size, if it is one."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return None
    m = re.search(r"(\d+(?:\.\d+)?)\s*([mMbB])", str(label))
    if not m:
        return None
    n = float(m.group(1)) * (1e6 if m.group(2).lower() == "m" else 1e9)
    for name, v in PAPER_SIZES.items():
        if abs(n - v) / v < 0.05:
            return name
    return None


def _blank(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def parse_knobs(setting: Any) -> dict[str, str]:
    """`k=v;k=v` -> {k: v}; a label setting (no "=") has no knobs."""
    if _blank(setting) or "=" not in str(setting):
        return {}
    return dict(part.split("=", 1) for part in str(setting).split(";") if part)


def run_knobs(runs: pd.DataFrame) -> pd.Series:
    """Each run's router knobs (`RUN_KNOBS`) as a setting string, from its `model.router.*` config."""

    def fmt(v: Any, kind: str) -> str | None:
        if _blank(v):
            return None
        if kind == "on":
            return str(int(float(v) > 0))
        try:
            return f"{float(v):g}"
        except (TypeError, ValueError):
            return str(v)

    cols = {k: (f"model.router.{c}", kind) for k, (c, kind) in RUN_KNOBS.items()}
    out = []
    for _, r in runs.iterrows():
        parts = [(k, fmt(r.get(c), kind)) for k, (c, kind) in cols.items()]
        out.append(";".join(f"{k}={v}" for k, v in parts if v is not None))
    return pd.Series(out, index=runs.index, dtype=object)


def _knobs_match(have: Any, want: Any) -> bool:
    """Every knob of the paper setting `want` equals the run's (numbers compared as floats)."""
    wanted = parse_knobs(want)
    if not wanted:
        return True
    got = parse_knobs(have)
    for k, v in wanted.items():
        if k not in got:
            return False
        try:
            same = math.isclose(float(got[k]), float(v), rel_tol=1e-6)
        except ValueError:
            same = got[k] == v
        if not same:
            return False
    return True


def _same_setup(row: dict, p: dict, rel_tol: float) -> bool:
    fam = row.get("_family")
    if fam != p["family"] or paper_size(row.get("_size")) != p["size"]:
        return False
    if _blank(row.get("_N_r")) or int(row["_N_r"]) != int(p["N_r"]):
        return False
    if fam == "vanilla" and str(p.get("layers", "")).isdigit():  # Tables 10/15: reduced-depth vanillas
        if _blank(row.get("_layers")) or int(row["_layers"]) != int(p["layers"]):
            return False
    if not _knobs_match(row.get("_knobs"), p.get("setting")):
        return False
    if fam != "vanilla":
        if row.get("_sharing") != p["sharing"] or row.get("_kv") != p["kv"]:
            return False
    if fam == "mor" and row.get("_router") != p["router"]:
        return False
    if row.get("_budget_kind") != p["budget_kind"] or _blank(row.get("_budget_value")):
        return False
    return abs(float(row["_budget_value"]) - p["budget_value"]) <= rel_tol * p["budget_value"]


def join_paper(
    table: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    tables: Iterable[str] | None = None,
    rel_tol: float = 0.03,
) -> pd.DataFrame:
    """Add `paper_<col>` and `delta_<col>` (ours - paper) where a row's setup matches a paper row.

    Setup = size, family, N_r, sharing/kv (non-vanilla), router (MoR), budget kind and value (within
    `rel_tol`), the layer count of vanilla rows that print one, and the knobs of `setting` (module
    docstring). `table` is a `build_table` result (it carries hidden `_family`, `_size`, `_layers`,
    `_knobs`, ... keys and the columns' `paper` metric names in attrs). `tables`: paper tables to
    search, in order of preference (default: DEFAULT_TABLES[name], else the spec's `paper_tables`,
    else table3, table9, fig4a). Adds `paper_table`.
    """
    from .tables import SPECS

    paper = load_paper() if paper is None else paper
    name = table.attrs.get("table", "")
    spec = SPECS.get(name)
    order = (
        tuple(tables)
        if tables
        else DEFAULT_TABLES.get(name) or (spec.paper_tables if spec else ()) or ("table3", "table9", "fig4a")
    )
    mapping: dict[str, str] = table.attrs.get("paper") or (
        {c.label: c.paper for c in spec.columns if c.paper} if spec else {}
    )
    out = table.copy()
    out.attrs = dict(table.attrs)
    setups = paper[paper["table"].isin(order)].copy()
    text = ["setting", "layers", "sharing", "router", "kv"]
    setups[text] = setups[text].fillna("")
    setups["_rank"] = setups["table"].map({t: i for i, t in enumerate(order)})
    keys = [
        "table",
        "setting",
        "model",
        "family",
        "size",
        "layers",
        "sharing",
        "N_r",
        "router",
        "kv",
        "budget_kind",
        "budget_value",
        "params_nonemb",
        "flops",
        "tokens",
    ]
    # one record per setup; blank params/flops/tokens (tables that print none) must not drop it
    setups["_setup"] = setups.groupby(keys, dropna=False, sort=False).ngroup()
    attrs = setups.drop_duplicates("_setup").set_index("_setup")[keys + ["_rank"]]
    values = setups.pivot_table(index="_setup", columns="metric", values="value", aggfunc="first")
    wide = attrs.join(values).sort_values("_rank", kind="stable")
    candidates = wide.to_dict("records")
    matched: list[dict | None] = []
    for row in out.to_dict("records"):
        matched.append(next((p for p in candidates if _same_setup(row, p, rel_tol)), None))
    out["paper_table"] = [m["table"] if m is not None else None for m in matched]
    formats = dict(out.attrs.get("formats", {}))
    for label, metric in mapping.items():
        if label not in out:
            continue
        vals = [
            float(m[metric]) if m is not None and metric in m and not _blank(m[metric]) else math.nan
            for m in matched
        ]
        out[f"paper_{label}"] = vals
        out[f"delta_{label}"] = pd.to_numeric(out[label], errors="coerce") - pd.Series(vals, index=out.index)
    out.attrs["formats"] = formats
    n = sum(m is not None for m in matched)
    out.attrs["paper_matches"] = n
    return out
