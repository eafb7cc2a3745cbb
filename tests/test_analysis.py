"""Analysis package: loader, seed aggregation, table specs, paper join, plots, CLI and notebook.

Everything runs on a fake results tree from `analysis.fixtures.make_fake_results`; expected values
are computed from the tree's manifest (the rows it wrote), not hard-coded.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.fixtures import FakeRun, _make_run, bench_value, eval_value, make_fake_results
from analysis.load import aggregate_seeds, load_results, model_label
from analysis.paper import RUN_KNOBS, join_paper, load_paper, paper_size, parse_knobs
from analysis.tables import SPECS, Column, MixedConfigError, RowKey, TableSpec, build_table, render

REPO = Path(__file__).resolve().parents[1]
TASKS6 = ["LD", "HS", "PQ", "WG", "ARC", "MMLU"]


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_fake_results(tmp_path_factory.mktemp("results") / "runs")


@pytest.fixture(scope="module")
def results(tree):
    return load_results(tree.root)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    """Fewer runs, for the slower plot, CLI and notebook tests."""
    return make_fake_results(tmp_path_factory.mktemp("small") / "runs", seeds=(0, 1), paper_like=False)


def runs_of(table: pd.DataFrame, i: int, tree) -> list[FakeRun]:
    return [tree.runs[r] for r in table["_run_ids"].iloc[i].split(";")]


def expected_row(runs: list[FakeRun]) -> dict[str, float]:
    """Table-3 style values of a setup, from the manifest (mean over its seeds)."""

    def acc(r, task, metric):
        return 100 * eval_value(r, task, metric)

    per_run = []
    for r in runs:
        v = {
            "NLL": eval_value(r, "val", "nll"),
            "LD": acc(r, "lambada_openai", "acc"),
            "HS": acc(r, "hellaswag", "acc_norm"),
            "PQ": acc(r, "piqa", "acc_norm"),
            "WG": acc(r, "winogrande", "acc"),
            "ARC": (acc(r, "arc_easy", "acc_norm") + acc(r, "arc_challenge", "acc_norm")) / 2,
            "MMLU": acc(r, "mmlu_continuation", "acc"),
            "Params": r.summary["params_unique_nonemb"],
            "Tokens": r.summary["tokens"],
        }
        v["Avg"] = float(np.mean([v[k] for k in TASKS6]))
        per_run.append(v)
    return {k: float(np.mean([v[k] for v in per_run])) for k in per_run[0]}


# -- loader ------------------------------------------------------------------------------------------------
def test_loader_finds_every_run_with_status(tree, results):
    runs = results.runs.set_index("run_id")
    assert set(runs.index) == set(tree.runs)  # .hydra/config.yaml copies are not runs
    for rid, fake in tree.runs.items():
        assert runs.at[rid, "status"] == fake.status
        assert runs.at[rid, "experiment"] == fake.experiment
        assert runs.at[rid, "run"] == rid.split("/")[-1]
        assert Path(runs.at[rid, "path"]).is_dir()
    assert set(runs["status"]) == {"done", "failed", "partial", "pending"}
    failed = runs[runs["status"] == "failed"]
    assert failed["failure"].str.contains("out of memory").all()
    for col in (
        "model.family",
        "model.num_recursions",
        "model.router.name",
        "data.source",
        "data.tokenizer",
        "data.seq_len",
        "train.budget.kind",
        "train.budget.value",
        "seed",
        "size",
        "params_unique_nonemb",
        "flops",
        "tokens",
        "budget.kind",
        "summary.status",
        "git_sha",
        "env.device",
        "env.versions.torch",
    ):
        assert col in runs, col
    assert "model.family" in results.config_columns and "params_unique_nonemb" not in results.config_columns


def test_loader_frames_hold_every_row(tree, results):
    for rid, fake in tree.runs.items():
        assert (results.metrics["run_id"] == rid).sum() == len(fake.metrics)  # torn last line skipped
        assert (results.evals["run_id"] == rid).sum() == len(fake.evals)
        assert (results.bench["run_id"] == rid).sum() == len(fake.bench)
    nll = results.val_nll()
    for rid, fake in tree.runs.items():
        if fake.status == "done":
            assert nll[rid] == pytest.approx(eval_value(fake, "val", "nll"))
        elif fake.status == "partial":  # no eval.jsonl: last val/nll of metrics.jsonl
            last = [m["val/nll"] for m in fake.metrics if "val/nll" in m][-1]
            assert nll[rid] == pytest.approx(last)


def test_loader_labels(results):
    runs = results.runs
    assert set(runs["label"]) == {"Vanilla", "Recursive", "MoR-E", "MoR-T"}
    mor_t = runs[runs["model.router.name"].eq("token_choice") & runs["family"].eq("mor")]
    assert (mor_t["label_nr"] == "MoR-T-" + mor_t["N_r"].astype(str)).all()
    assert (runs.loc[runs["family"] == "vanilla", "label_nr"] == "Vanilla").all()
    assert model_label("mor", "expert_choice", 3, with_nr=True) == "MoR-E-3"
    assert model_label("mor", "my_router") == "MoR-my_router"
    assert model_label("mor", "pkg.routers.Fancy") == "MoR-fancy"  # a dotted path: its class
    assert model_label("mor", "harness.oracle_router.OracleRouter") == "MoR-oracle"
    assert model_label("recursive", None, 2) == "Recursive"


def test_lm_eval_metric_names_are_split(tmp_path):
    run = tmp_path / "exp" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("experiment: exp\nmodel: {family: vanilla}\n")
    (run / "eval.jsonl").write_text(
        json.dumps({"task": "piqa", "metric": "acc_norm,none", "value": 0.6}) + "\n"
    )
    res = load_results(tmp_path)
    assert res.evals[["metric", "filter"]].iloc[0].tolist() == ["acc_norm", "none"]
    assert res.runs["status"].iloc[0] == "pending"


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.yaml"):
        load_results(tmp_path)


def test_aggregate_seeds(tree, results):
    runs = results.runs.assign(val_nll=results.val_nll().to_numpy())
    done = runs[runs["status"] == "done"]
    agg = aggregate_seeds(done, values=["val_nll"], config_columns=results.config_columns)
    assert agg["n_seeds"].sum() == len(done)
    multi = agg[agg["n_seeds"] > 1]
    assert len(multi) == 2  # demo vanilla and demo MoR-E-3, three seeds each
    for _, row in multi.iterrows():
        fakes = [tree.runs[r] for r in row["run_ids"].split(";")]
        assert sorted(f.config["seed"] for f in fakes) == [0, 1, 2]
        vals = [eval_value(f, "val", "nll") for f in fakes]
        assert row["val_nll_mean"] == pytest.approx(np.mean(vals))
        assert row["val_nll_std"] == pytest.approx(np.std(vals, ddof=1))
    assert agg.loc[agg["n_seeds"] == 1, "val_nll_std"].isna().all()


# -- tables ------------------------------------------------------------------------------------------------
def test_table3_values_from_runs(tree, results):
    t = build_table(results, "table3")
    assert len(t) == len(tree.by(experiment="table3"))
    assert list(t.columns[:4]) == ["Budget", "Model", "Share", "KV"]
    for i in range(len(t)):
        (fake,) = runs_of(t, i, tree)
        exp = expected_row([fake])
        for k, v in exp.items():
            assert t[k].iloc[i] == pytest.approx(v), k
        assert t["FLOPs"].iloc[i] == pytest.approx(fake.summary["flops"])
        assert t["N_r"].iloc[i] == fake.config["model"]["num_recursions"]
        want = model_label(fake.config["model"]["family"], fake.config["model"]["router"]["name"])
        assert t["Model"].iloc[i] == want
    assert t.attrs["warnings"] == []


def test_demo_table_seeds_partial_and_exclusions(tree, results):
    t = build_table(results, "demo")
    assert {"Seeds", "Status", "NLL std", "demo_mc", "demo_lastword", "Decode tok/s"} <= set(t.columns)
    for i in range(len(t)):
        fakes = runs_of(t, i, tree)
        assert t["Seeds"].iloc[i] == len(fakes)
        if fakes[0].status == "partial":
            assert t["Status"].iloc[i] == "partial"
            assert t["NLL"].iloc[i] == pytest.approx(
                [m["val/nll"] for m in fakes[0].metrics if "val/nll" in m][-1]
            )
            assert math.isnan(t["demo_mc"].iloc[i])
            continue
        nll = [eval_value(f, "val", "nll") for f in fakes]
        assert t["NLL"].iloc[i] == pytest.approx(np.mean(nll))
        if len(fakes) > 1:
            assert t["NLL std"].iloc[i] == pytest.approx(np.std(nll, ddof=1))
        assert t["demo_mc"].iloc[i] == pytest.approx(
            100 * np.mean([eval_value(f, "demo_mc", "acc") for f in fakes])
        )
        assert t["Decode tok/s"].iloc[i] == pytest.approx(
            np.mean([bench_value(f, "decode", "tokens_per_s", "max") for f in fakes])
        )
    warns = "\n".join(t.attrs["warnings"])
    for fake in tree.by(experiment="demo"):
        if fake.status in ("failed", "pending"):
            assert fake.run_id in warns and fake.run_id not in ";".join(t["_run_ids"])
        if fake.status == "partial":
            assert fake.run_id in warns


def test_eval_rows_prefer_causal_and_latest_step(tree, results):
    t = build_table(results, "demo")
    mor = [i for i in range(len(t)) if runs_of(t, i, tree)[0].config["model"]["family"] == "mor"]
    assert mor
    for i in mor:
        fakes = runs_of(t, i, tree)
        causal = np.mean([eval_value(f, "val", "nll", causal=True) for f in fakes])
        topk = np.mean([eval_value(f, "val", "nll", causal=False) for f in fakes])
        assert causal != pytest.approx(topk)
        assert t["NLL"].iloc[i] == pytest.approx(causal)


def test_throughput_ratios(tree, results):
    t = build_table(results, "throughput")
    vanilla = tree.by(experiment="table3", **{"model.family": "vanilla"})[0]
    v32 = bench_value(vanilla, "decode", "tokens_per_s", 32)
    vmax = bench_value(vanilla, "decode", "tokens_per_s", "max")
    assert len(t) == len(tree.by(experiment="table3"))
    for i in range(len(t)):
        (fake,) = runs_of(t, i, tree)
        assert t["x Vanilla B=32"].iloc[i] == pytest.approx(
            bench_value(fake, "decode", "tokens_per_s", 32) / v32
        )
        assert t["x Vanilla B=max"].iloc[i] == pytest.approx(
            bench_value(fake, "decode", "tokens_per_s", "max") / vmax
        )
        assert t["Max B"].iloc[i] == max(b["batch_size"] for b in fake.bench if b["probe"] == "decode")


def test_ablation_tables_select_their_runs(tree, results):
    iso = build_table(results, "isoflop")
    assert len(iso) == len(tree.by(experiment="isoflop")) == 18
    assert iso["_budget_kind"].eq("flops").all()
    # the ablation specs default to experiments the fake tree lacks: nothing, and a note saying so
    empty = build_table(results, "sharing")
    assert empty.empty and "--experiment" in empty.attrs["warnings"][0]
    sharing = build_table(results, "sharing", experiments=["demo"])
    assert set(sharing["_family"]) == {"vanilla", "recursive"}
    assert {"Cyc", "M-Cyc"} <= set(sharing["Share"])
    routing = build_table(results, "routing", experiments=["demo"])
    assert set(routing["_family"]) == {"mor"} and {"MaxVio", "Entropy", "Samp-Acc %"} <= set(routing.columns)
    kv = build_table(results, "kv", experiments=["demo"])
    for i in range(len(kv)):
        rows = [b for f in runs_of(kv, i, tree) for b in f.bench]
        for col, fld in (
            ("KV B/tok (analytic)", "kv_bytes_per_token_analytic"),
            ("KV B/tok", "kv_bytes_per_token"),
        ):
            vals = [b[fld] for b in rows if fld in b]  # from whichever probe rows report it
            want = np.mean(vals) if vals else math.nan
            assert kv[col].iloc[i] == pytest.approx(want, nan_ok=True)
    assert {"Cache", "Share"} <= set(kv["KV"])


def test_new_table_is_one_spec(tree, results):
    spec = TableSpec(
        "mine",
        "My table",
        rows=(RowKey("Model", "label"), RowKey("N_r", "N_r")),
        columns=(
            Column("Loss", "metrics", "loss", fmt=".3f"),
            Column("Max mem", "metrics", "peak_mem_bytes", agg="max", fmt="human"),
        ),
        experiments=("table3",),
    )
    t = build_table(results, spec)
    for i in range(len(t)):
        (fake,) = runs_of(t, i, tree)
        assert t["Loss"].iloc[i] == pytest.approx(fake.metrics[-1]["loss"])
        assert t["Max mem"].iloc[i] == max(m["peak_mem_bytes"] for m in fake.metrics)


def test_render_every_spec(results, tmp_path):
    for name in SPECS:
        t = build_table(
            results,
            name,
            experiments=None if name in ("table3", "isoflop", "throughput", "demo") else ["demo"],
        )
        assert not t.empty, name
        paths = render(t, tmp_path, name)
        md, tex = paths["md"].read_text(), paths["tex"].read_text()
        assert md.startswith(f"# {SPECS[name].title}") and "| Model" in md
        assert ("## Warnings" in md) == bool(t.attrs["warnings"])
        assert r"\begin{tabular}" in tex and r"\toprule" in tex
        back = pd.read_csv(paths["csv"])
        assert len(back) == len(t)
        for c in SPECS[name].columns:
            if c.label in t:
                np.testing.assert_allclose(
                    back[c.label].to_numpy(float), t[c.label].to_numpy(float), rtol=1e-9
                )
        if t["_n_seeds"].max() > 1:
            assert " ± " in md and r"$\pm$" in tex


def test_markdown_formats(results, tmp_path):
    t = build_table(results, "table3")
    md = render(t, tmp_path, "t3")["md"].read_text()
    row = next(line for line in md.splitlines() if "| Vanilla" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    i = list(t.columns).index("NLL")
    assert cells[i] == f"{t['NLL'].iloc[0]:.4f}"
    assert cells[list(t.columns).index("Params")].endswith("M")


# -- paper ---------------------------------------------------------------------------------------------
PAPER_SETUP = [
    "table",
    "setting",
    "family",
    "size",
    "layers",
    "sharing",
    "N_r",
    "router",
    "kv",
    "budget_value",
]
PAPER_TASKS = ["lambada_openai", "hellaswag", "piqa", "winogrande", "arc", "mmlu_continuation"]


def paper_wide(p: pd.DataFrame, table: str) -> pd.DataFrame:
    """One row per setup of a paper table, one column per metric."""
    s = p[p["table"] == table].fillna({c: "" for c in ("setting", "layers", "sharing", "router", "kv")})
    return s.pivot_table(index=PAPER_SETUP, columns="metric", values="value", aggfunc="first")


def paper_cell(p: pd.DataFrame, table: str, metric: str, **setup) -> float:
    s = p[(p["table"] == table) & (p["metric"] == metric)]
    for k, v in setup.items():
        s = s[s[k] == v]
    assert len(s) == 1, (table, metric, setup, len(s))
    return float(s["value"].iloc[0])


def test_paper_csv_facts():
    p = load_paper()
    setups = p.drop_duplicates(PAPER_SETUP)
    assert setups["table"].value_counts().to_dict() == {
        "table9": 36,
        "table3": 12,
        "fig4a": 4,
        "table10": 22,
        "table13": 18,
        "table14": 12,
        "table15": 23,
    }
    assert not p.duplicated(PAPER_SETUP + ["metric"]).any()
    # Avg is the plain mean of 6 tasks (to the table's rounding), except where a note says otherwise
    tol = {
        "table3": 0.07,
        "table9": 0.006,
        "table10": 0.007,
        "table13": 0.07,
        "table14": 0.07,
        "table15": 0.07,
    }
    noted = set(p.loc[p["note"].fillna("").str.contains("not the mean"), "setting"])
    for table, t in tol.items():
        w = paper_wide(p, table)
        assert len(w) == setups["table"].eq(table).sum()
        w = w[w[PAPER_TASKS].notna().all(axis=1) & ~w.index.get_level_values("setting").isin(noted)]
        assert (w[PAPER_TASKS].mean(axis=1) - w["avg"]).abs().max() < t, table
    v = p[(p["table"] == "table3") & (p["family"] == "vanilla") & (p["metric"] == "nll")]
    assert v["value"].tolist() == [2.7824]
    fig = p[(p["table"] == "fig4a") & (p["metric"] == "decode_speedup_bmax")].set_index("N_r")["value"]
    assert fig.loc[4] == 2.06


def test_paper_csv_ablation_tables():
    """Tables 10, 13, 14 and 15 (reference/paper.md sections 4.1-4.3), as printed there."""
    p = load_paper()
    n = p.groupby("table").size()
    assert (n["table10"], n["table13"], n["table14"], n["table15"]) == (176, 177, 120, 177)

    # Table 10: per size 3 unshared vanillas and 4 sharings x N_r 2, 3; all 8 metrics; 10B tokens
    t10 = paper_wide(p, "table10")
    assert t10.notna().all().all() and list(t10.columns) == sorted(PAPER_TASKS + ["avg", "nll"])
    fam = t10.reset_index().groupby(["size", "family"]).size().to_dict()
    assert fam == {
        ("135M", "vanilla"): 3,
        ("135M", "recursive"): 8,
        ("360M", "vanilla"): 3,
        ("360M", "recursive"): 8,
    }
    assert (p.loc[p["table"] == "table10", "budget_value"] == 1e10).all()
    assert paper_cell(p, "table10", "nll", size="360M", sharing="middle_cycle", N_r=2) == 2.8295
    assert paper_cell(p, "table10", "hellaswag", size="135M", family="vanilla", layers="15") == 30.10
    assert paper_cell(p, "table10", "avg", size="360M", sharing="sequence", N_r=3) == 38.30
    m_cyc = p[(p["table"] == "table10") & (p["size"] == "135M") & (p["sharing"] == "middle_cycle")]
    assert m_cyc.groupby("N_r")["params_nonemb"].unique().to_dict() == {2: [5.7e7], 3: [3.9e7]}

    # Table 13: 18 expert-choice rows; router knobs in `setting`; NaN NLLs and "-" cells left out
    t13 = paper_wide(p, "table13")
    assert len(t13) == 18 and t13["nll"].notna().sum() == 16 and t13["sampling_acc"].notna().sum() == 17
    assert t13["dead_token_ratio"].notna().all() and t13[PAPER_TASKS + ["avg"]].notna().all().all()
    final = "func=sigmoid;alpha=0.1;aux=bce;coeff=0.001;arch=linear;warmup=0;zloss=0"
    assert paper_cell(p, "table13", "nll", setting=final) == 2.8667
    assert paper_cell(p, "table13", "sampling_acc", setting=final) == 99.2
    assert paper_cell(p, "table13", "dead_token_ratio", setting=final) == 0.1
    tanh = "func=tanh;alpha=1.0;aux=aux_router;arch=mlp;warmup=0;zloss=0"
    assert paper_cell(p, "table13", "lambada_openai", setting=tanh) == 18.26
    assert paper_cell(p, "table13", "nll", router="random") == 2.9335

    # Table 14: 12 token-choice rows, 10 metrics each
    t14 = paper_wide(p, "table14")
    assert len(t14) == 12 and t14.notna().all().all() and {"maxvio", "entropy"} <= set(t14.columns)
    last = "func=softmax;alpha=1.0;aux=balance;coeff=0.1;arch=linear;zloss=0"
    assert paper_cell(p, "table14", "nll", setting=last) == 2.9358
    assert paper_cell(p, "table14", "maxvio", setting=last) == 0.266
    lf = "func=softmax;alpha=1.0;aux=loss_free;u=0.01;arch=mlp;zloss=1"
    assert paper_cell(p, "table14", "entropy", setting=lf) == 0.297
    assert paper_cell(p, "table14", "entropy", setting="func=rand;zloss=1") == 1.099
    for table in ("table13", "table14"):
        for setting in p.loc[p["table"] == table, "setting"]:
            assert set(parse_knobs(setting)) <= set(RUN_KNOBS), setting

    # Table 15: 23 rows; the shifted MoR expert KV-share row keeps NLL and Avg only; one MMLU left out
    t15 = paper_wide(p, "table15").reset_index()
    assert len(t15) == 23
    assert t15.groupby("family").size().to_dict() == {"vanilla": 6, "recursive": 12, "mor": 5}
    assert t15["kv"].eq("share").sum() == 4 + 6 + 3 and t15["nll"].notna().all() and t15["avg"].notna().all()
    incomplete = t15[t15[PAPER_TASKS].isna().any(axis=1)]
    assert len(incomplete) == 2
    shifted = dict(router="expert_choice", kv="share", setting="10B tok")
    assert paper_cell(p, "table15", "nll", **shifted) == 2.8895
    assert paper_cell(p, "table15", "avg", **shifted) == 39.2
    assert paper_cell(p, "table15", "nll", setting="kv_hybrid=1") == 2.8653
    assert paper_cell(p, "table15", "nll", setting="kv_pattern=cycle;kv_group=2") == 2.7650
    rec = p[(p["table"] == "table15") & (p["sharing"] == "cycle") & (p["N_r"] == 2) & (p["kv"] == "cache")]
    assert "mmlu_continuation" not in set(rec["metric"]) and rec["note"].str.contains("28.8").all()
    # rows the paper prints twice agree: Table 15 vs Tables 10, 13, 14
    for setup, other, other_setup in (
        (dict(family="vanilla", layers="32", setting="10B tok"), "table10", dict(size="360M", layers="32")),
        (
            dict(sharing="sequence", N_r=3, kv="cache"),
            "table10",
            dict(size="360M", sharing="sequence", N_r=3),
        ),
        (dict(router="expert_choice", kv="cache"), "table13", dict(setting=final)),
        (dict(router="token_choice", kv="cache"), "table14", dict(setting=last)),
    ):
        assert paper_cell(p, "table15", "nll", **setup) == paper_cell(p, other, "nll", **other_setup)


def test_paper_size():
    assert paper_size("360M") == "360M"
    assert paper_size("smollm-360m") == "360M"
    assert paper_size("1.7b") == "1.7B" and paper_size("1700M") == "1.7B"
    assert paper_size("tiny") is None and paper_size(None) is None


def test_join_paper_deltas(tree, results):
    paper = load_paper()
    t = join_paper(build_table(results, "table3"))
    assert t.attrs["paper_matches"] == len(t)
    for i in range(len(t)):
        (fake,) = runs_of(t, i, tree)
        m = fake.config["model"]
        budget = fake.config["train"]["budget"]
        p = paper[
            (paper["table"] == "table3")
            & (paper["family"] == m["family"])
            & (paper["N_r"] == m["num_recursions"])
            & (paper["budget_kind"] == budget["kind"])
        ]
        if m["family"] == "mor":
            p = p[(p["router"] == m["router"]["name"]) & (p["kv"] == m["kv"])]
        nll = p.loc[p["metric"] == "nll", "value"]
        assert len(nll) == 1
        assert t["paper_NLL"].iloc[i] == nll.iloc[0]
        assert t["delta_NLL"].iloc[i] == pytest.approx(t["NLL"].iloc[i] - nll.iloc[0])
        hs = p.loc[p["metric"] == "hellaswag", "value"].iloc[0]
        assert t["delta_HS"].iloc[i] == pytest.approx(t["HS"].iloc[i] - hs)
        assert t["paper_Params"].iloc[i] == p["params_nonemb"].iloc[0]
    thr = join_paper(build_table(results, "throughput"))
    mor = thr[
        (thr["_family"] == "mor")
        & (thr["_router"] == "expert_choice")
        & (thr["_kv"] == "cache")
        & (thr["_budget_kind"] == "flops")
    ]
    got = dict(zip(mor["N_r"], mor["paper_x Vanilla B=max"]))
    assert got == {2: 1.60, 3: 1.95, 4: 2.06}
    # setups the paper does not have get no paper values
    assert thr.loc[thr["_kv"] == "share", "paper_table"].isna().all()
    iso = join_paper(build_table(results, "isoflop"))
    assert iso.attrs["paper_matches"] == 0  # tiny sizes are not paper sizes


def _patched_run(
    root: Path,
    experiment: str,
    family: str,
    n_r: int = 1,
    router: str = "expert_choice",
    name: str | None = None,
    model: dict | None = None,
    **kw,
) -> FakeRun:
    """A fake 360M run at the ablations' 10B-token budget, its model config patched by `model`."""
    run = _make_run(
        root, experiment, "360M", family, n_r, router, budget=("tokens", 1e10), seq_len=2048, name=name, **kw
    )
    for k, v in (model or {}).items():
        obj = run.config["model"]
        *parents, leaf = k.split(".")
        for part in parents:
            obj = obj[part]
        obj[leaf] = v
    (root / run.run_id / "config.yaml").write_text(yaml.safe_dump(run.config, sort_keys=False))
    return run


def test_join_paper_ablation_tables(tmp_path):
    """Runs whose setup is a Table 10/13/14/15 row get that row's numbers; other setups get none."""
    root = tmp_path / "runs"
    tanh = {"router.func": "tanh", "router.alpha": 1.0, "router.arch": "mlp", "router.aux_coeff": 0.01}
    runs = {
        # sharing (Table 10): a recursive sharing variant, unshared vanillas told apart by depth
        "cyc2": _patched_run(root, "sharing", "recursive", 2, sharing="cycle"),
        "van32": _patched_run(root, "sharing_baselines", "vanilla", name="van32"),
        "van16": _patched_run(root, "sharing_baselines", "vanilla", name="van16", model={"n_layers": 16}),
        "van20": _patched_run(root, "sharing_baselines", "vanilla", name="van20", model={"n_layers": 20}),
        # routing (Tables 13, 14): matched on the router knobs
        "ec": _patched_run(root, "routing", "mor", 3, name="ec"),  # released config: linear, sigmoid, bce
        "ec_tanh": _patched_run(root, "routing", "mor", 3, name="ec_tanh", model=tanh),
        "ec_warm": _patched_run(
            root, "routing", "mor", 3, name="ec_warm", model={"router.capacity_warmup_steps": 500}
        ),
        "ec_none": _patched_run(  # MLP router with z-loss: no such Table 13 row
            root, "routing", "mor", 3, name="ec_none", model={"router.arch": "mlp", "router.z_coeff": 1e-3}
        ),
        "tc": _patched_run(
            root, "routing", "mor", 3, "token_choice", name="tc", model={"router.z_coeff": 0.0}
        ),
        "tc_z": _patched_run(root, "routing", "mor", 3, "token_choice", name="tc_z"),  # z_coeff 1e-5 > 0
        # kv (Table 15)
        "kv_ec": _patched_run(root, "kv", "mor", 3, name="kv_ec", kv="share"),
        "kv_cyc2": _patched_run(root, "kv", "recursive", 2, name="kv_cyc2", sharing="cycle"),
    }
    res = load_results(root)
    paper = load_paper()
    ids = {r.run_id: k for k, r in runs.items()}

    def joined(name: str) -> dict[str, dict]:
        t = join_paper(build_table(res, name))
        return {ids[r]: row for r, row in zip(t["_run_ids"], t.to_dict("records"))}

    def check(row: dict, table: str, label: str, metric: str, **setup) -> None:
        want = paper_cell(paper, table, metric, **setup)
        assert row["paper_table"] == table and row[f"paper_{label}"] == want
        assert row[f"delta_{label}"] == pytest.approx(row[label] - want)

    sh = joined("sharing")
    check(sh["cyc2"], "table10", "NLL", "nll", size="360M", sharing="cycle", N_r=2)
    check(sh["cyc2"], "table10", "HS", "hellaswag", size="360M", sharing="cycle", N_r=2)
    assert sh["cyc2"]["paper_Params"] == 1.57e8 and sh["cyc2"]["paper_Tokens"] == 1e10
    check(sh["van32"], "table10", "NLL", "nll", size="360M", family="vanilla", layers="32")
    check(sh["van16"], "table10", "Avg", "avg", size="360M", family="vanilla", layers="16")
    assert pd.isna(sh["van20"]["paper_table"])  # no 20-layer vanilla in Table 10

    ro = joined("routing")
    final = "func=sigmoid;alpha=0.1;aux=bce;coeff=0.001;arch=linear;warmup=0;zloss=0"
    check(ro["ec"], "table13", "NLL", "nll", setting=final)
    check(ro["ec"], "table13", "Samp-Acc %", "sampling_acc", setting=final)
    check(ro["ec"], "table13", "Dead %", "dead_token_ratio", setting=final)
    check(
        ro["ec_tanh"],
        "table13",
        "NLL",
        "nll",
        setting="func=tanh;alpha=1.0;aux=bce;coeff=0.01;arch=mlp;warmup=0;zloss=0",
    )
    check(ro["ec_warm"], "table13", "NLL", "nll", setting=final.replace("warmup=0", "warmup=1"))
    assert pd.isna(ro["ec_none"]["paper_table"])
    last = "func=softmax;alpha=1.0;aux=balance;coeff=0.1;arch=linear;zloss=0"
    check(ro["tc"], "table14", "NLL", "nll", setting=last)
    check(ro["tc"], "table14", "MaxVio", "maxvio", setting=last)
    check(ro["tc"], "table14", "Entropy", "entropy", setting=last)
    check(ro["tc_z"], "table14", "Avg", "avg", setting=last.replace("zloss=0", "zloss=1"))

    kv = joined("kv")
    check(kv["kv_ec"], "table15", "NLL", "nll", router="expert_choice", kv="share", setting="10B tok")
    check(kv["kv_ec"], "table15", "Avg", "avg", router="expert_choice", kv="share", setting="10B tok")
    assert math.isnan(kv["kv_ec"]["paper_HS"])  # shifted cells were left out
    check(kv["kv_cyc2"], "table15", "NLL", "nll", family="recursive", sharing="cycle", N_r=2, kv="cache")
    assert math.isnan(kv["kv_cyc2"]["paper_MMLU"])  # the MMLU cell left out (note)


# -- comparability checks ------------------------------------------------------------------------------
def test_mixed_tokenizer_refused_unless_allowed(tmp_path, capsys):
    from analysis.cli import main

    fake = make_fake_results(
        tmp_path / "runs", isoflop=False, paper_like=False, statuses=False, seeds=(0,), mixed_tokenizer=True
    )
    res = load_results(fake.root)
    with pytest.raises(MixedConfigError, match="data.tokenizer"):
        build_table(res, "demo")
    t = build_table(res, "demo", allow_mixed=True)
    assert any("INCOMPARABLE" in w and "data.tokenizer" in w for w in t.attrs["warnings"])
    assert main([str(fake.root), "--out", str(tmp_path / "out"), "--plots", "none"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "data.tokenizer" in err and "--allow-mixed" in err
    assert not (tmp_path / "out" / "tables" / "demo.md").exists()
    assert main([str(fake.root), "--out", str(tmp_path / "out"), "--plots", "none", "--allow-mixed"]) == 0
    md = (tmp_path / "out" / "tables" / "demo.md").read_text()
    assert "## Warnings" in md and "data.tokenizer" in md


def test_git_sha_and_seq_len_flags(tmp_path, capsys):
    from analysis.cli import main

    fake = make_fake_results(
        tmp_path / "runs", isoflop=False, paper_like=False, statuses=False, seeds=(0,), odd_sha=True
    )
    out = tmp_path / "out"
    assert main([str(fake.root), "--out", str(out), "--tables", "demo", "--plots", "none"]) == 0
    md = (out / "tables" / "demo.md").read_text()
    assert "## Warnings" in md and "2 git SHAs" in md
    assert "warning [demo]" in capsys.readouterr().err
    res = load_results(fake.root)
    res.runs.loc[0, "data.seq_len"] = 4096
    t = build_table(res, "demo")
    assert any("data.seq_len" in w for w in t.attrs["warnings"])


# -- plots ------------------------------------------------------------------------------------------------
def test_fit_isoflop_optima():
    from analysis.plots import fit_isoflop_optima

    x = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    y = 0.2 * (np.log10(x) - 6.2) ** 2 + 2.5
    df = pd.DataFrame({"Params": x, "NLL": y, "model": "m", "budget": 1e15})
    row = fit_isoflop_optima(df).iloc[0]
    assert row["x_opt"] == pytest.approx(10**6.2, rel=1e-6)
    assert row["y_opt"] == pytest.approx(2.5) and row["in_range"]
    few = fit_isoflop_optima(df.iloc[:2])
    assert math.isnan(few["x_opt"].iloc[0])


def test_plots_write_png_and_pdf(small_tree, tmp_path):
    from analysis.plots import PLOTS, make_plots

    written = make_plots(load_results(small_tree.root), tmp_path)
    assert set(written) == set(PLOTS)
    for name, paths in written.items():
        assert paths, name
        for ext in ("png", "pdf"):
            files = [p for p in paths if p.suffix == f".{ext}"]
            assert files and all(p.stat().st_size > 1000 for p in files), (name, ext)
    stems = {p.stem for ps in written.values() for p in ps}
    assert {
        "isoflop",
        "isoflop_optimum",
        "loss_curves",
        "loss_vs_flops",
        "throughput",
        "kv_memory",
        "router_depth_class",
        "router_depth_position",
    } <= stems
    optima = pd.read_csv(tmp_path / "isoflop_optima.csv")
    assert len(optima) == 6  # 3 families x 2 budgets


def test_router_depth_frame(tree, results):
    from analysis.plots import router_depth_frame

    df = router_depth_frame(results)
    expert = tree.by(experiment="demo", **{"model.router.name": "expert_choice", "model.family": "mor"})[0]
    got = df[df["run_id"] == expert.run_id]
    assert {"content", "pos_0"} <= set(got["cls"]) and got.loc[got["cls"] == "pos_64", "position"].eq(
        64
    ).all()
    want = {
        (e["metric"].split("/")[1], int(e["metric"].split("/r")[1])): e["value"]
        for e in expert.evals
        if e["metric"].startswith("depth_frac/") and e["causal"]
    }
    for _, r in got.iterrows():
        assert r["value"] == pytest.approx(want[(r["cls"], r["recursion"])])
    # token-choice runs only have nll/depth<k> token counts: class "all", fraction reaching depth >= k
    token = tree.by(experiment="demo", **{"model.router.name": "token_choice", "model.family": "mor"})
    token = [t for t in token if t.status == "done"][0]
    n = {
        int(e["metric"][9:]): e["n"]
        for e in token.evals
        if e["metric"].startswith("nll/depth") and e["causal"]
    }
    got = df[df["run_id"] == token.run_id].set_index("recursion")
    assert set(got["cls"]) == {"all"}
    for k in n:
        assert got.at[k, "value"] == pytest.approx(sum(v for j, v in n.items() if j >= k) / sum(n.values()))


def test_plots_skip_without_data(tmp_path, caplog):
    from analysis.plots import make_plots

    run = tmp_path / "runs" / "exp" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("experiment: exp\nmodel: {family: vanilla}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "loss": 3.0}) + "\n")
    with caplog.at_level(logging.INFO, logger="analysis"):
        written = make_plots(
            load_results(tmp_path / "runs"),
            tmp_path / "plots",
            ["throughput", "kv_memory", "router_depth", "isoflop"],
        )
    assert all(v == [] for v in written.values())
    for name in ("throughput", "kv_memory", "router_depth", "isoflop"):
        assert f"plot {name} skipped" in caplog.text


# -- CLI and notebook -----------------------------------------------------------------------------------
def test_cli_end_to_end(small_tree, tmp_path, capsys):
    from analysis.cli import main

    out = tmp_path / "report"
    rc = main([str(small_tree.root), "--out", str(out), "--plots", "loss,throughput"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert str(out / "tables") in stdout and str(out / "plots") in stdout
    for name in ("demo", "isoflop"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0
    assert "table3: skipped (no runs in experiments table3*" in stdout
    for stem in ("loss_curves", "throughput"):
        assert (out / "plots" / f"{stem}.png").exists() and (out / "plots" / f"{stem}.pdf").exists()
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["status"].unique()) == ["done", "failed", "partial", "pending"]
    # one experiment for every table
    rc = main(
        [
            str(small_tree.root),
            "--out",
            str(out / "demo"),
            "--experiment",
            "demo",
            "--plots",
            "none",
            "--tables",
            "sharing,routing,kv",
        ]
    )
    assert rc == 0
    assert all((out / "demo" / "tables" / f"{n}.md").exists() for n in ("sharing", "routing", "kv"))
    assert main([str(small_tree.root), "--out", str(out), "--tables", "nope"]) == 2
    assert "unknown table nope" in capsys.readouterr().err


def test_cli_empty_root(tmp_path, capsys):
    from analysis.cli import main

    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_notebook_regenerates_everything(small_tree, tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    # A kernelspec that runs this interpreter (the venv), whatever else is installed for "python3".
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (MoR Bench venv)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    out = tmp_path / "nb_out"
    monkeypatch.setenv("MOR_RESULTS", str(small_tree.root))
    monkeypatch.setenv("MOR_OUT", str(out))
    nb = nbformat.read(REPO / "analysis" / "report.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    for name in ("demo", "isoflop"):
        assert (out / "tables" / f"{name}.md").exists()
    pngs = {p.stem for p in (out / "plots").glob("*.png")}
    pdfs = {p.stem for p in (out / "plots").glob("*.pdf")}
    assert (
        pngs == pdfs and {"isoflop", "loss_curves", "throughput", "kv_memory", "router_depth_class"} <= pngs
    )
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images


def test_analysis_never_imports_models_or_harness():
    for path in (REPO / "analysis").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("models", "harness", "torch"), f"{path.name} imports {n}"
