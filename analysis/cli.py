"""`mor-tables RESULTS_ROOT --out DIR`: every table (md/csv/tex) and plot (png/pdf) from a results tree.

    mor-tables results/runs --out results/report
    mor-tables results/runs --out /tmp/r --tables table3,throughput --plots none
    mor-tables results/runs --out /tmp/r --experiment 'demo*' --allow-mixed

Writes DIR/tables/<name>.{md,csv,tex} (and <name>_vs_paper.* where runs match a setup of the
paper), DIR/plots/<name>.{png,pdf}, and DIR/runs.csv (every run found with its status). Warnings
(runs from several git SHAs, different data.seq_len, unfinished or excluded runs) go into each
table's Markdown "Warnings" section and to stderr. Runs that differ in data.source or
data.tokenizer are refused (exit status 2, naming the key) unless --allow-mixed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .load import load_results
from .paper import DEFAULT_TABLES, join_paper
from .tables import SPECS, MixedConfigError, build_table, render

PLOT_NAMES = ("isoflop", "loss", "loss_vs_flops", "throughput", "kv_memory", "router_depth")


@dataclass
class Report:
    """What `generate` wrote: table name -> files, plot name -> files, warnings per table."""

    out: Path
    tables: dict[str, dict[str, Path]] = field(default_factory=dict)
    plots: dict[str, list[Path]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    runs_csv: Path | None = None


def _names(arg: str | None, known: Iterable[str], what: str) -> list[str]:
    known = list(known)
    if arg is None or arg.strip().lower() == "all":
        return known
    if arg.strip().lower() in ("none", ""):
        return []
    names = [n.strip() for n in arg.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; allowed: {', '.join(known)} (or all, none)")
    return names


def generate(
    root: str | Path,
    out: str | Path,
    tables: Iterable[str] | None = None,
    plots: Iterable[str] | None = None,
    allow_mixed: bool = False,
    experiments: Iterable[str] | None = None,
    paper: bool = True,
) -> Report:
    """Load `root`, build and write the tables and plots (default: all) under `out`.

    Raises MixedConfigError before writing anything when a table mixes data sources/tokenizers.
    """
    results = load_results(root)
    out = Path(out)
    exps = list(experiments) if experiments else None
    names = list(SPECS) if tables is None else list(tables)
    built = {n: build_table(results, n, allow_mixed=allow_mixed, experiments=exps) for n in names}
    report = Report(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    runs_cols = [
        c
        for c in (
            "run_id",
            "experiment",
            "label_nr",
            "size_label",
            "budget_label",
            "seed",
            "status",
            "git_sha",
            "failure",
            "path",
        )
        if c in results.runs
    ]
    report.runs_csv = out / "runs.csv"
    results.runs[runs_cols].to_csv(report.runs_csv, index=False)
    for name, table in built.items():
        report.warnings[name] = list(table.attrs.get("warnings", []))
        if table.empty:  # reported once by main ("no runs (skipped)"), with the experiments it looked for
            continue
        report.tables[name] = render(table, out / "tables", name)
        if paper and name in DEFAULT_TABLES:
            joined = join_paper(table)
            if joined.attrs.get("paper_matches"):
                joined = joined[joined["paper_table"].notna()].copy()
                joined.attrs.update(table.attrs, title=f"{table.attrs.get('title', name)}: ours vs paper")
                report.tables[f"{name}_vs_paper"] = render(joined, out / "tables", f"{name}_vs_paper")
    plot_names = list(PLOT_NAMES) if plots is None else list(plots)
    if plot_names:
        from .plots import make_plots  # matplotlib/seaborn only when plotting

        report.plots = make_plots(
            results, out / "plots", plot_names, allow_mixed=allow_mixed, experiments=exps
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mor-tables",
        description="Paper-style tables (md/csv/tex) and plots (png/pdf) from a MoR Bench results tree.",
    )
    ap.add_argument("root", help="results root, e.g. results/runs (searched recursively for config.yaml)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tables", default="all", help=f"comma list of {', '.join(SPECS)} | all | none")
    ap.add_argument("--plots", default="all", help=f"comma list of {', '.join(PLOT_NAMES)} | all | none")
    ap.add_argument(
        "--experiment",
        action="append",
        default=None,
        metavar="PATTERN",
        help="only runs whose experiment matches this glob (repeatable); overrides each table's default",
    )
    ap.add_argument(
        "--allow-mixed",
        action="store_true",
        help="tabulate runs with different data.source / data.tokenizer (flagged, not refused)",
    )
    ap.add_argument("--no-paper", action="store_true", help="skip the <table>_vs_paper comparison tables")
    ap.add_argument("-q", "--quiet", action="store_true", help="only errors and warnings on stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        tables = _names(args.tables, SPECS, "table")
        plots = _names(args.plots, PLOT_NAMES, "plot")
        report = generate(
            args.root,
            args.out,
            tables,
            plots,
            allow_mixed=args.allow_mixed,
            experiments=args.experiment,
            paper=not args.no_paper,
        )
    except MixedConfigError as e:
        print(f"mor-tables: refused: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        print(f"mor-tables: error: {e}", file=sys.stderr)
        return 2

    for name, warns in report.warnings.items():
        for w in warns if name in report.tables else []:
            print(f"mor-tables: warning [{name}]: {w}", file=sys.stderr)
    print(f"runs: {report.runs_csv}")
    if report.tables:
        print(f"tables -> {report.out / 'tables'}")
        for name, paths in report.tables.items():
            print(f"  {name}: {', '.join(p.name for p in paths.values())}")
    for name in tables:
        if name not in report.tables:
            why = next((w for w in report.warnings.get(name, []) if w.startswith("no runs in")), "no runs")
            print(f"  {name}: skipped ({why})")
    if plots:
        print(f"plots -> {report.out / 'plots'}")
        for name, paths in report.plots.items():
            print(f"  {name}: {', '.join(p.name for p in paths) if paths else 'no data (skipped)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
