"""Offline lm-eval tasks in the synthetic language (harness.data), for models trained on that corpus.

`write_demo_tasks(out_dir)` writes JSONL data and lm-eval 0.4 task YAMLs (mirroring the bundled
piqa/arc and lambada configs) and returns the directory to pass as lm-eval's `include_path`:

- ``demo_mc`` (multiple_choice; acc, acc_norm): a synthetic document cut just before a recalled value
  (``... get k7 is`` -> the value set for k7 earlier, distractors are the document's other values) or an
  arithmetic result (``... calc 3 + 4 * 2 =`` -> 14, distractors random numbers); 4 choices.
- ``demo_lastword`` (loglikelihood; acc = greedy match, perplexity): LAMBADA-style, predict the last word
  of a document cut right after its last recall or arithmetic answer.
- group ``demo`` with both.

Data is read with ``dataset_path: json`` and absolute ``data_files``, so nothing touches the hub. Every
word is in `SYNTHETIC_VOCAB`. Task documents are drawn from indices >= `TASK_DOC_OFFSET` of the seed's
synthetic stream, which no training run reaches, so they are in distribution but unseen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import yaml

from .data import N_NUMBERS, N_VALUES, TOKEN_CLASSES, synthetic_documents

TASK_DOC_OFFSET = 10**9
_LASTWORD_SHIFT = 10**8  # demo_lastword reads other documents than demo_mc
TASK_DOC_WORDS = 64  # short documents: contexts stay within a tiny model's 128-token window
N_CHOICES = 4
FEWSHOT_DOCS = 20  # documents in the validation (few-shot) split of each task
_RECALL, _ARITH = TOKEN_CLASSES.index("recall"), TOKEN_CLASSES.index("arith")

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_PPL = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}


def _answer_points(seed: int, start: int) -> Iterator[tuple[list[str], int, str]]:
    """(document words, position of its last recall/arith answer, kind), alternating the kinds."""
    want = "recall"
    for text, cls in synthetic_documents(seed, start=start, doc_words=TASK_DOC_WORDS):
        target = _RECALL if want == "recall" else _ARITH
        hits = [j for j, c in enumerate(cls) if c == target]
        if hits:  # the last answer of the kind: the longest context and recall distance
            j = hits[-1]
            yield text.split(), j, want
            want = "arith" if want == "recall" else "recall"


def _mc_items(seed: int, n: int) -> list[dict]:
    rng = random.Random(f"demo_mc/{seed}")
    items = []
    for words, j, kind in _answer_points(seed, TASK_DOC_OFFSET):
        answer = words[j]
        if kind == "recall":
            pool = sorted({w for w in words[:j] if w.startswith("v") and w != answer})
            rng.shuffle(pool)
            fill = [f"v{i}" for i in rng.sample(range(N_VALUES), N_VALUES)]
        else:
            pool = []
            fill = [str(i) for i in rng.sample(range(N_NUMBERS), N_NUMBERS)]
        distractors = []
        for w in pool + fill:
            if w != answer and w not in distractors:
                distractors.append(w)
        choices = distractors[: N_CHOICES - 1]
        label = rng.randrange(N_CHOICES)
        choices.insert(label, answer)
        items.append({"context": " ".join(words[:j]), "choices": choices, "label": label, "kind": kind})
        if len(items) == n:
            return items
    raise AssertionError("unreachable: the synthetic stream is infinite")


def _lastword_items(seed: int, n: int) -> list[dict]:
    items = []
    for words, j, kind in _answer_points(seed, TASK_DOC_OFFSET + _LASTWORD_SHIFT):
        items.append({"text": " ".join(words[: j + 1]), "kind": kind})
        if len(items) == n:
            return items
    raise AssertionError("unreachable: the synthetic stream is infinite")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task_yaml(name: str, files: dict[str, Path], body: dict) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(p) for split, p in files.items()}},
        "validation_split": "validation",
        "test_split": "test",
        "fewshot_split": "validation",
        **body,
        "metadata": {"version": 1.0},
    }


def write_demo_tasks(out_dir: Path, seed: int = 1234, n: int = 200) -> Path:
    """Write the demo tasks' data and YAMLs under `out_dir`; returns the (absolute) lm-eval include_path.

    `n` test documents per task plus `FEWSHOT_DOCS` few-shot documents (disjoint); deterministic in `seed`."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    total = n + FEWSHOT_DOCS
    tasks = {
        "demo_mc": (
            _mc_items(seed, total),
            {
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_target": "label",
                "doc_to_choice": "choices",
                "metric_list": [_ACC, _ACC_NORM],
            },
        ),
        "demo_lastword": (
            _lastword_items(seed, total),
            {  # as lm_eval/tasks/lambada/lambada_openai.yaml
                "output_type": "loglikelihood",
                "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                "metric_list": [_PPL, _ACC],
            },
        ),
    }
    for name, (rows, body) in tasks.items():
        files = {"test": out / f"{name}_test.jsonl", "validation": out / f"{name}_validation.jsonl"}
        _write_jsonl(files["test"], rows[:n])
        _write_jsonl(files["validation"], rows[n:])
        (out / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, files, body), sort_keys=False))
    group = {
        "group": "demo",
        "task": list(tasks),
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }
    (out / "demo.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return out


__all__ = ["write_demo_tasks", "TASK_DOC_OFFSET"]
