"""Load a results tree (docs/run_dir.md) into tidy pandas DataFrames.

Analysis reads only the files of the run-directory contract; it never imports `models` or
`harness`. A run directory is any directory under the root holding a `config.yaml` (hidden
directories such as Hydra's `.hydra/` and `checkpoints/` are skipped). Every run found is kept and
given a status, so partial, failed and pending runs are visible instead of silently missing.

Frames of a `Results`:

- `runs`: one row per run. Flattened config with dotted names (`model.family`,
  `model.router.name`, `data.source`, `train.budget.kind`, ...), summary.json fields
  (`params_unique_nonemb`, `flops`, `tokens`, `budget.kind`, ...; its own `status` is kept as
  `summary.status`), env.json (`git_sha`, `git_dirty`, `env.device`, `env.versions.torch`, ...),
  and identification: `run_id` (path relative to the root, the join key), `experiment`, `run`
  (directory name), `path`, `status` (done | failed | partial | pending), `failure` (FAILED text).
  Derived labels used by tables and plots: `family`, `N_r`, `label` ("Vanilla", "Recursive",
  "MoR-E", "MoR-T", "MoR-<router>"), `label_nr` (label with N_r, e.g. "MoR-E-3"), `size_label`,
  `sharing_label`, `kv_label`, `budget_kind`, `budget_value`, `budget_label`.
- `metrics`: metrics.jsonl rows plus `run_id`.
- `evals`: eval.jsonl rows plus `run_id`; an lm-eval style metric "acc,none" is split into
  `metric` "acc" and `filter` "none".
- `bench`: bench.jsonl rows plus `run_id`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger("analysis")

STATUSES = ("done", "failed", "partial", "pending")
ID_COLUMNS = ("run_id", "experiment", "run", "path", "status")
# Config keys that do not define a setup: seeds, names, output locations and job plumbing. Runs that
# differ only in these are seeds (or reruns) of one setup.
SEED_IGNORE = (
    "*seed",
    "run_name",
    "results_root",
    "*_dir",
    "hydra.*",
    "stages",
    "train.progress",
    "train.max_retries",
    "train.resume_force",
    "train.wandb",
)

SHARING_LABELS = {
    "cycle": "Cyc",
    "sequence": "Seq",
    "middle_cycle": "M-Cyc",
    "middle_sequence": "M-Seq",
}
KV_LABELS = {"cache": "Cache", "share": "Share"}
ROUTER_LABELS = {"expert_choice": "MoR-E", "token_choice": "MoR-T"}
FAMILY_ORDER = {"vanilla": 0, "recursive": 1, "mor": 2}


# -- small helpers -----------------------------------------------------------------------------------
def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}; lists become JSON strings so the values stay hashable."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            elif isinstance(v, dict):
                out[key] = None
            elif isinstance(v, list | tuple):
                out[key] = json.dumps(list(v), default=str)
            else:
                out[key] = v
    return out


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines, tolerating a torn last line of a run that is still writing (skipped, warned)."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable JSON line skipped (a run still writing?)", path, i)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text() or "{}")
    except json.JSONDecodeError as e:
        log.warning("%s: unreadable JSON (%s); ignored", path, e)
        return {}
    return obj if isinstance(obj, dict) else {}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _router_short(name: str) -> str:
    """Registry names as they are; a dotted path by its class: pkg.mod.OracleRouter -> oracle."""
    if "." not in name:
        return name
    cls = name.rsplit(".", 1)[-1]
    return cls.removesuffix("Router").lower() or cls


def model_label(family: Any, router: Any = None, num_recursions: Any = None, with_nr: bool = False) -> str:
    """ "Vanilla" | "Recursive" | "MoR-E" | "MoR-T" | "MoR-<router>", optionally suffixed "-<N_r>"."""
    fam = "" if _missing(family) else str(family)
    if fam == "vanilla":
        return "Vanilla"
    if fam == "recursive":
        base = "Recursive"
    elif fam == "mor":
        name = "" if _missing(router) else str(router)
        base = ROUTER_LABELS.get(name) or (f"MoR-{_router_short(name)}" if name else "MoR")
    else:
        base = fam or "?"
    if with_nr and not _missing(num_recursions):
        return f"{base}-{int(num_recursions)}"
    return base


def _budget_label(kind: Any, value: Any) -> str | None:
    if _missing(kind):
        return None
    if _missing(value):
        return str(kind)
    unit = {"flops": "FLOPs", "tokens": "tok", "steps": "steps"}.get(str(kind), str(kind))
    return f"{float(value):.3g} {unit}"


# -- discovery ---------------------------------------------------------------------------------------
def find_run_dirs(root: Path) -> list[Path]:
    """Directories under root with a config.yaml; skips hidden dirs, checkpoints and nested runs."""
    root = Path(root)
    found: list[Path] = []
    for cfg in sorted(root.rglob("config.yaml")):
        rel = cfg.parent.relative_to(root)
        if any(p.startswith(".") or p == "checkpoints" or p == "lm_eval" for p in rel.parts):
            continue
        found.append(cfg.parent)
    # A config.yaml inside another run directory (e.g. an artifact copy) is not a run of its own.
    runs = set(found)
    return [d for d in found if not any(p in runs for p in d.parents)]


def run_status(run_dir: Path) -> str:
    """done (DONE) | failed (FAILED, no DONE) | partial (metrics, neither) | pending (config only)."""
    if (run_dir / "DONE").exists():
        return "done"
    if (run_dir / "FAILED").exists():
        return "failed"
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return "partial"
    return "pending"


# -- Results -------------------------------------------------------------------------------------------
@dataclass
class Results:
    """Tidy frames of one results root; `run_id` joins them."""

    root: Path
    runs: pd.DataFrame
    metrics: pd.DataFrame
    evals: pd.DataFrame
    bench: pd.DataFrame
    config_columns: list[str] = field(default_factory=list)

    def select(self, keep: pd.Series | Iterable[str]) -> Results:
        """A Results restricted to some runs: a boolean mask over `runs` or an iterable of run_ids."""
        if isinstance(keep, pd.Series) and keep.dtype == bool:
            ids = set(self.runs.loc[keep, "run_id"])
        else:
            ids = set(keep)

        def sub(df: pd.DataFrame) -> pd.DataFrame:
            return df[df["run_id"].isin(ids)].reset_index(drop=True) if "run_id" in df else df

        return Results(
            self.root,
            sub(self.runs),
            sub(self.metrics),
            sub(self.evals),
            sub(self.bench),
            list(self.config_columns),
        )

    def experiments(self, patterns: Iterable[str]) -> Results:
        """Runs whose `experiment` matches any fnmatch pattern."""
        pats = list(patterns)
        mask = self.runs["experiment"].astype(str).map(lambda e: any(fnmatch.fnmatch(e, p) for p in pats))
        return self.select(mask.astype(bool))

    def last_metrics(self, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """Last non-null value of each metrics column per run (index run_id)."""
        if self.metrics.empty:
            return pd.DataFrame(index=pd.Index([], name="run_id"))
        df = self.metrics
        if "step" in df:
            df = df.sort_values("step", kind="stable")
        cols = [c for c in (columns or df.columns) if c in df and c != "run_id"]
        return df.groupby("run_id", sort=False)[cols].last()

    def val_nll(self) -> pd.Series:
        """Validation NLL per run: eval.jsonl task val / metric nll (latest step), else last `val/nll`."""
        out = pd.Series(index=self.runs["run_id"], dtype=float, name="val_nll")
        ev = self.evals
        if not ev.empty and {"task", "metric", "value"} <= set(ev.columns):
            sel = ev[(ev["task"] == "val") & (ev["metric"] == "nll")]
            # the causal inference rule wins over e.g. non-causal expert-choice top-k, then the latest step
            sel = sel.assign(
                _causal=sel["causal"].eq(True) if "causal" in sel else True,
                _step=pd.to_numeric(sel["step"], errors="coerce") if "step" in sel else 0.0,
            )
            sel = sel.sort_values(["_causal", "_step"], kind="stable", na_position="first")
            out.update(sel.groupby("run_id")["value"].last())
        if "val/nll" in self.metrics:
            last = self.last_metrics(["val/nll"])["val/nll"]
            out = out.fillna(last.reindex(out.index))
        return out

    def summary(self) -> pd.DataFrame:
        """One line per run: what it is and its status (for a quick look)."""
        cols = [
            c for c in ("run_id", "experiment", "label_nr", "size_label", "seed", "status") if c in self.runs
        ]
        return self.runs[cols]


def _empty(cols: Iterable[str] = ("run_id",)) -> pd.DataFrame:
    return pd.DataFrame(columns=list(cols))


def _split_metric(evals: pd.DataFrame) -> pd.DataFrame:
    """lm-eval metric keys come as "acc,none": keep "acc" in `metric` and the filter apart."""
    if evals.empty or "metric" not in evals:
        return evals
    m = evals["metric"].astype(str)
    has = m.str.contains(",", regex=False)
    if has.any():
        parts = m[has].str.split(",", n=1)
        evals.loc[has, "metric"] = parts.str[0]
        evals["filter"] = evals.get("filter", pd.Series(index=evals.index, dtype=object))
        evals.loc[has, "filter"] = parts.str[1]
    return evals


def _derive(runs: pd.DataFrame) -> pd.DataFrame:
    """Labels the tables and plots group by; computed from config with summary fallbacks."""

    def col(name: str, default: Any = None) -> pd.Series:
        return runs[name] if name in runs else pd.Series(default, index=runs.index, dtype=object)

    family = col("model.family").where(col("model.family").notna(), col("family"))
    runs["family"] = family
    nr = pd.to_numeric(col("model.num_recursions"), errors="coerce")
    nr = nr.where(nr.notna() | ~family.eq("vanilla"), 1)
    runs["N_r"] = nr.astype("Int64")
    router = col("model.router.name").where(family.eq("mor"))
    runs["label"] = [model_label(f, r) for f, r in zip(family, router)]
    runs["label_nr"] = [
        model_label(f, r, n, with_nr=f != "vanilla") for f, r, n in zip(family, router, runs["N_r"])
    ]
    sharing = col("model.sharing").where(~family.eq("vanilla"))
    runs["sharing_label"] = sharing.map(lambda s: SHARING_LABELS.get(s, s) if not _missing(s) else "–")
    kv = col("model.kv").where(~family.eq("vanilla"))
    runs["kv_label"] = kv.map(lambda s: KV_LABELS.get(s, s) if not _missing(s) else "–")
    size = col("size")
    fallback = [
        f"d{int(d)}-L{int(n)}" if not (_missing(d) or _missing(n)) else None
        for d, n in zip(
            pd.to_numeric(col("model.d_model"), errors="coerce"),
            pd.to_numeric(col("model.n_layers"), errors="coerce"),
        )
    ]
    runs["size_label"] = size.where(size.notna(), pd.Series(fallback, index=runs.index, dtype=object))
    kind = col("train.budget.kind").where(col("train.budget.kind").notna(), col("budget.kind"))
    value = pd.to_numeric(col("train.budget.value"), errors="coerce")
    value = value.where(value.notna(), pd.to_numeric(col("budget.value"), errors="coerce"))
    runs["budget_kind"] = kind
    runs["budget_value"] = value
    runs["budget_label"] = [_budget_label(k, v) for k, v in zip(kind, value)]
    return runs


def load_results(root: str | Path) -> Results:
    """Read every run directory under `root` (see module docstring for the frames)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"results root {root} does not exist (expected results/runs/<experiment>/<run>/)"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"results root {root} is not a directory")
    dirs = find_run_dirs(root)
    if not dirs:
        raise ValueError(
            f"no run directories under {root}: expected <experiment>/<run>/config.yaml files "
            "(see docs/run_dir.md)"
        )

    run_rows: list[dict] = []
    config_cols: dict[str, None] = {}
    frames: dict[str, list[pd.DataFrame]] = {"metrics": [], "evals": [], "bench": []}
    files = {"metrics": "metrics.jsonl", "evals": "eval.jsonl", "bench": "bench.jsonl"}
    for d in dirs:
        rel = d.relative_to(root).as_posix()
        run_id = rel if rel != "." else d.name
        row: dict[str, Any] = {}
        try:
            cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
            if not isinstance(cfg, dict):
                raise ValueError("top level is not a mapping")
        except (yaml.YAMLError, ValueError) as e:
            log.warning("%s: unreadable config (%s); run kept without config", d / "config.yaml", e)
            cfg = {}
            row["load_error"] = f"config.yaml: {e}"
        flat_cfg = flatten(cfg)
        config_cols.update(dict.fromkeys(flat_cfg))
        row.update(flat_cfg)
        summary = flatten(_read_json(d / "summary.json"))
        if "status" in summary:
            summary["summary.status"] = summary.pop("status")
        for k, v in summary.items():
            row.setdefault(k, v)
        env = _read_json(d / "env.json")
        row["git_sha"] = env.pop("git_sha", None)
        row["git_dirty"] = env.pop("git_dirty", None)
        for k, v in flatten(env, "env").items():
            row.setdefault(k, v)
        parent = Path(rel).parent.as_posix()
        exp = cfg.get("experiment")
        row.update(
            run_id=run_id,
            experiment=str(exp) if exp is not None else ("" if parent == "." else parent),
            run=d.name,
            path=str(d),
            status=run_status(d),
            failure=(d / "FAILED").read_text().strip() if (d / "FAILED").exists() else None,
        )
        run_rows.append(row)
        for key, fname in files.items():
            rows = read_jsonl(d / fname)
            if rows:
                df = pd.DataFrame.from_records(rows)
                df.insert(0, "run_id", run_id)
                frames[key].append(df)

    runs = pd.DataFrame.from_records(run_rows)
    front = [c for c in ID_COLUMNS if c in runs]
    runs = runs[front + [c for c in runs.columns if c not in front]]
    runs = _derive(runs)

    def cat(key: str) -> pd.DataFrame:
        parts = [f for f in frames[key] if not f.empty]
        return pd.concat(parts, ignore_index=True, sort=False) if parts else _empty()

    evals = _split_metric(cat("evals"))
    res = Results(root, runs, cat("metrics"), evals, cat("bench"), list(config_cols))
    counts = runs["status"].value_counts().to_dict()
    log.info(
        "loaded %d runs from %s (%s)",
        len(runs),
        root,
        ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES if counts.get(s)),
    )
    return res


# -- seeds ---------------------------------------------------------------------------------------------
def identity_columns(
    columns: Iterable[str], config_columns: Iterable[str], ignore: Iterable[str] = SEED_IGNORE
) -> list[str]:
    """Config columns that define a setup: all except seeds, run names and output paths."""
    have = set(columns)
    pats = list(ignore)
    return [c for c in config_columns if c in have and not any(fnmatch.fnmatch(c, p) for p in pats)]


def aggregate_seeds(
    df: pd.DataFrame,
    values: Iterable[str] | None = None,
    by: Iterable[str] | None = None,
    config_columns: Iterable[str] | None = None,
    seed_col: str = "seed",
) -> pd.DataFrame:
    """Mean and std over seeds of runs whose other config is identical.

    `by`: the setup columns (default: every config column except seeds/run names/paths, taken from
    `config_columns`, else every column with a "." in its name). `values`: numeric columns to
    aggregate (default: every numeric non-setup column). Returns one row per setup with the setup
    columns, `<v>_mean`, `<v>_std` (NaN for a single seed), `n_seeds`, `seeds` and `run_ids`.
    """
    if df.empty:
        return df.copy()
    if by is None:
        cfg = list(config_columns) if config_columns is not None else [c for c in df.columns if "." in c]
        by = identity_columns(df.columns, cfg)
    by = [c for c in by if c in df.columns and c != seed_col]
    if values is None:
        skip = set(by) | {seed_col, "run_id"}
        values = [
            c
            for c in df.columns
            if c not in skip
            and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c])
        ]
    values = list(values)
    work = df.copy()
    for c in by:  # unhashable or mixed values would break groupby; strings compare fine
        if work[c].map(lambda v: isinstance(v, list | dict)).any():
            work[c] = work[c].map(lambda v: json.dumps(v, default=str) if isinstance(v, list | dict) else v)
    if not by:
        work["_all"] = 0
        by = ["_all"]
    g = work.groupby(by, dropna=False, sort=False)
    out = g[values].mean(numeric_only=True).add_suffix("_mean") if values else g.size().to_frame().iloc[:, :0]
    if values:
        out = out.join(g[values].std(ddof=1, numeric_only=True).add_suffix("_std"))
    out["n_seeds"] = g.size()
    if seed_col in work:
        out["seeds"] = g[seed_col].agg(lambda s: ",".join(str(v) for v in s if not _missing(v)))
    if "run_id" in work:
        out["run_ids"] = g["run_id"].agg(lambda s: ";".join(map(str, s)))
    out = out.reset_index()
    return out.drop(columns=["_all"], errors="ignore")


def sort_key_family(s: pd.Series) -> pd.Series:
    return s.map(lambda f: FAMILY_ORDER.get(f, 9))


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([mMbBkK])")


def size_sort_value(label: Any) -> float:
    """Orders size labels: "135M" < "360m" < "1.7B"; names without a number sort by a known ladder."""
    if _missing(label):
        return math.inf
    s = str(label)
    m = _SIZE_RE.search(s)
    if m:
        mult = {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
        return float(m.group(1)) * mult
    ladder = ["nano", "micro", "tiny", "mini", "small", "base", "medium", "large", "xl"]
    low = s.lower()
    for i, name in enumerate(ladder):
        if low.startswith(name):
            return float(i)
    m = re.search(r"d(\d+)-L(\d+)", s)
    if m:
        return float(m.group(1)) ** 2 * float(m.group(2)) / 1e12
    return math.inf
