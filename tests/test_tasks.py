"""harness.tasks: offline lm-eval demo tasks in the synthetic language."""

from __future__ import annotations

import json

import pytest
import yaml

from harness.data import SYNTHETIC_VOCAB
from harness.tasks import write_demo_tasks


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_is_deterministic_in_vocab_and_correct(tmp_path):
    a = write_demo_tasks(tmp_path / "a", seed=7, n=30)
    b = write_demo_tasks(tmp_path / "b", seed=7, n=30)
    c = write_demo_tasks(tmp_path / "c", seed=8, n=30)
    assert a.is_absolute() and (a / "demo.yaml").exists()
    for name in ("demo_mc_test.jsonl", "demo_lastword_test.jsonl", "demo_mc_validation.jsonl"):
        assert (a / name).read_text() == (b / name).read_text() != (c / name).read_text()
    vocab = set(SYNTHETIC_VOCAB)
    mc = _rows(a / "demo_mc_test.jsonl")
    assert len(mc) == 30 and {r["kind"] for r in mc} == {"recall", "arith"}
    for r in mc:
        assert len(r["choices"]) == len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
        assert set(r["context"].split()) | set(r["choices"]) <= vocab
        answer = r["choices"][r["label"]]
        if r["kind"] == "recall":  # the answer is the value most recently set for the queried key
            words = r["context"].split()
            key = words[-2]
            sets = [words[i + 3] for i in range(len(words) - 3) if words[i] == "set" and words[i + 1] == key]
            assert sets == [answer]
    last = _rows(a / "demo_lastword_test.jsonl")
    assert len(last) == 30 and all(set(r["text"].split()) <= vocab for r in last)
    test_texts = {r["text"] for r in last}
    assert not test_texts & {r["text"] for r in _rows(a / "demo_lastword_validation.jsonl")}
    task = yaml.safe_load((a / "demo_mc.yaml").read_text())
    assert task["dataset_path"] == "json" and all(
        p.startswith(str(a)) for p in task["dataset_kwargs"]["data_files"].values()
    )


def test_lm_eval_loads_tasks_and_builds_requests_offline(tmp_path, offline):
    from lm_eval.tasks import TaskManager, get_task_dict

    inc = write_demo_tasks(tmp_path / "tasks", n=12)
    tm = TaskManager(include_path=str(inc), include_defaults=False)
    tasks = get_task_dict(["demo_mc", "demo_lastword"], tm)
    assert set(tasks) == {"demo_mc", "demo_lastword"}
    mc, lw = tasks["demo_mc"], tasks["demo_lastword"]
    assert mc.OUTPUT_TYPE == "multiple_choice" and lw.OUTPUT_TYPE == "loglikelihood"
    assert set(mc._metric_fn_list) == {"acc", "acc_norm"} and set(lw._metric_fn_list) == {"acc", "perplexity"}
    for task in (mc, lw):
        task.build_all_requests(limit=5, rank=0, world_size=1)
    assert len(mc.instances) == 5 * 4 and len(lw.instances) == 5
    ctx, cont = mc.instances[0].arguments
    doc = mc.instances[0].doc
    assert ctx == doc["context"] and cont == " " + doc["choices"][0]
    ctx, cont = lw.instances[0].arguments
    assert ctx + cont == lw.instances[0].doc["text"] and cont.startswith(" ") and " " not in cont[1:]

    # few-shot contexts come from the validation split; the group resolves to both tasks
    mc.set_fewshot_seed(0)
    fs = mc.fewshot_context(mc.test_docs()[0], num_fewshot=2)
    assert fs.count("\n\n") == 2 and fs.endswith(mc.test_docs()[0]["context"])
    group = get_task_dict(["demo"], tm)
    (members,) = group.values()
    assert set(members) == {"demo_mc", "demo_lastword"}
