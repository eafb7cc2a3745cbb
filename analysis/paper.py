"""The paper's numbers (reference/paper.csv) and a join that puts them next to ours.

paper.csv is tidy: one row per (paper table, setup, metric). Setup columns: `table` (table3,
table9, fig4a), `setting`, `model`, `family` (vanilla | recursive | mor), `size` (135M, 360M,
730M, 1.7B), `layers`, `sharing`, `N_r` (1 for vanilla), `router` (expert_choice |
token_choice), `kv` (cache | share), `budget_kind` (flops | tokens), `budget_value`,
`params_nonemb`, `flops`, `tokens`; then `metric` (nll, lambada_openai, hellaswag, piqa,
winogrande, arc, mmlu_continuation, avg, decode_speedup_b32, decode_speedup_bmax, max_batch),
`value` (accuracies in % as printed) and `note`. Values are quoted from
shared/reference/paper.md (each table as printed; Table 3 and Table 9 differ slightly for the
same runs, so a join names the table it used).
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
DEFAULT_TABLES = {"table3": ("table3",), "isoflop": ("table9", "table3"), "throughput": ("fig4a",)}
SETUP_COLUMNS = ("family", "size", "sharing", "N_r", "router", "kv", "budget_kind", "budget_value")


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


def _same_setup(row: dict, p: dict, rel_tol: float) -> bool:
    fam = row.get("_family")
    if fam != p["family"] or paper_size(row.get("_size")) != p["size"]:
        return False
    if _blank(row.get("_N_r")) or int(row["_N_r"]) != int(p["N_r"]):
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
    `rel_tol`). `table` is a `build_table` result (it carries hidden `_family`, `_size`, ... keys and
    the columns' `paper` metric names in attrs). `tables`: paper tables to search, in order of
    preference (default per table name, else table3, table9, fig4a). Adds `paper_table`.
    """
    from .tables import SPECS

    paper = load_paper() if paper is None else paper
    name = table.attrs.get("table", "")
    order = tuple(tables) if tables else DEFAULT_TABLES.get(name, ("table3", "table9", "fig4a"))
    spec = SPECS.get(name)
    mapping: dict[str, str] = table.attrs.get("paper") or (
        {c.label: c.paper for c in spec.columns if c.paper} if spec else {}
    )
    out = table.copy()
    out.attrs = dict(table.attrs)
    setups = paper[paper["table"].isin(order)].copy()
    setups[["sharing", "router", "kv"]] = setups[["sharing", "router", "kv"]].fillna("")
    setups["_rank"] = setups["table"].map({t: i for i, t in enumerate(order)})
    keys = [
        "table",
        "setting",
        "model",
        "family",
        "size",
        "sharing",
        "N_r",
        "router",
        "kv",
        "budget_kind",
        "budget_value",
    ]
    wide = setups.pivot_table(
        index=keys + ["_rank", "params_nonemb", "flops", "tokens"],
        columns="metric",
        values="value",
        aggfunc="first",
    ).reset_index()
    wide = wide.sort_values("_rank", kind="stable")
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
