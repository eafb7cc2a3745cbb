"""Data: corpora, tokenizers, and packed, sharded, resumable loaders.

Sources (`data.source`):

- ``synthetic`` (default, offline): a seeded generator of documents in a small word-level language whose
  tokens differ in difficulty (see `TOKEN_CLASSES`): predictable filler phrases, structure words,
  irreducibly random tokens, key-value recall over a distance, and multi-step arithmetic. A class label is
  kept per token, so diagnostics can ask whether the router sends hard tokens deeper. Document ``i`` is a
  pure function of ``(seed, i)``; documents ``0 .. val_docs-1`` are the validation split and the training
  stream is ``val_docs, val_docs+1, ...`` (infinite, never repeats).
- ``text_files``: local files matched by the glob ``data.paths``: ``.txt`` (one document per blank-line
  separated block, the `datasets` "text" builder with ``sample_by="paragraph"``), ``.jsonl``/``.json``
  (field ``data.text_field``) and ``.parquet`` (column ``data.text_field``). All go through
  ``datasets.load_dataset`` with the packaged builders, the same code path as ``hf``.
- ``hf``: ``datasets.load_dataset(hf_name, hf_config, split=hf_split, streaming=hf_streaming)``; the paper's
  corpus is FineWeb-Edu (``HuggingFaceTB/smollm-corpus``, config ``fineweb-edu-dedup``). A local directory
  of data files works too (that is how the tests exercise this path offline).

For file and hf sources ``val_docs`` documents are held out (a seeded random choice; for streaming, the
first ``val_docs`` documents of the stream) and the remaining documents form the training set, reshuffled
every epoch (streaming: a seeded shuffle buffer) and cycled forever.

Packing: every document's tokens are followed by the tokenizer's EOS (the document separator) and the
documents are concatenated into one stream. A batch is a contiguous span of ``B*T + 1`` stream tokens:
``input_ids`` are its first ``B*T`` tokens and ``labels`` its last ``B*T``, both viewed as ``[B, T]``, so
every stream token is a label exactly once. ``token_class`` is the class of the label token (-1 for real
text, whose difficulty is unknown).

Sharding: rank ``r`` of ``w`` with micro-batch ``B`` reads the same global stream as every other rank, cuts
it into global batches of ``B*w`` rows, and keeps rows ``[r*B, (r+1)*B)`` of each. So the ranks are disjoint
and deterministic, and together they see exactly the rows that one process with batch ``B*w`` sees at the
same step: data-parallel training is the single-process run of the same global batch (up to float
reduction order), and the loader position does not depend on the world size. The price is that every rank
reads and tokenizes the whole stream (``w`` times the work of reading only its share): the synthetic
generator makes ~3M tokens/s and `tokenizers` encodes in parallel, far above a trainer's consumption; for
much larger worlds pre-tokenize. The loader position is ``(epoch, doc, offset)`` (the next global batch
starts at token ``offset`` of the ``doc``-th document of ``epoch``), the same on every rank: `state_dict` /
`load_state_dict` resume exactly.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SOURCES = ("synthetic", "text_files", "hf")
SPLITS = ("train", "val")
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | text_files | hf
    tokenizer: str = "synthetic"  # synthetic (fixed word vocab) | hf:<name-or-dir> | train:<vocab_size> (BPE)
    seq_len: int = 128  # tokens per row; a row reads seq_len + 1 stream tokens (inputs + shifted labels)
    paths: str | None = None  # text_files: glob of .txt/.jsonl/.json/.parquet files (`**` allowed)
    text_field: str = "text"  # text_files (.jsonl/.parquet) and hf: column holding the document text
    hf_name: str | None = None  # hf: dataset name or local dir, e.g. HuggingFaceTB/smollm-corpus
    hf_config: str | None = None  # hf: dataset config, e.g. fineweb-edu-dedup
    hf_split: str = "train"  # hf: split to read; the validation documents are held out from it
    hf_streaming: bool = False  # hf: stream the split instead of downloading and preparing it
    val_docs: int = 200  # number of documents held out for validation (a count, not a fraction)
    seed: int = 0  # synthetic corpus seed; held-out choice and epoch shuffles for file/hf sources
    cache_dir: str = "results/cache"  # trained tokenizers and prepared text_files datasets live here
    tokenizer_train_docs: int = 20000  # train:<n>: number of training documents the BPE trainer reads
    syn_doc_words: int = 256  # synthetic: mean words per document (uniform in [0.5, 1.5] x this)
    syn_kv_frac: float = 0.3  # synthetic: probability a segment sets or recalls a key's value
    syn_arith_frac: float = 0.2  # synthetic: probability a segment is an arithmetic problem
    syn_arith_steps: int = 3  # synthetic: most operations per arithmetic problem (1..this, left to right)


def validate_config(cfg: DataConfig) -> None:
    """Raise one clear ValueError naming the key for every user-fixable mistake, before any heavy work."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is invalid: allowed {', '.join(SOURCES)}")
    _parse_tokenizer_spec(cfg.tokenizer)
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise ValueError(f"data.seq_len={cfg.seq_len!r} must be an integer >= 2")
    if cfg.val_docs < 0:
        raise ValueError(f"data.val_docs={cfg.val_docs} must be >= 0")
    if cfg.tokenizer_train_docs < 1:
        raise ValueError(f"data.tokenizer_train_docs={cfg.tokenizer_train_docs} must be >= 1")
    if cfg.source == "text_files":
        _local_files(cfg)
    if cfg.source == "hf" and not cfg.hf_name:
        raise ValueError("data.hf_name is required for data.source=hf (a datasets name or a local directory)")
    if cfg.source == "synthetic":
        if cfg.syn_doc_words < 8:
            raise ValueError(f"data.syn_doc_words={cfg.syn_doc_words} must be >= 8")
        for key in ("syn_kv_frac", "syn_arith_frac"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(f"data.{key}={getattr(cfg, key)} must lie in [0, 1]")
        if cfg.syn_kv_frac + cfg.syn_arith_frac > 1.0:
            raise ValueError(
                f"data.syn_kv_frac + data.syn_arith_frac = {cfg.syn_kv_frac + cfg.syn_arith_frac} "
                "must be <= 1"
            )
        if cfg.syn_arith_steps < 1:
            raise ValueError(f"data.syn_arith_steps={cfg.syn_arith_steps} must be >= 1")


# ==========================================================================================================
# The synthetic language
# ==========================================================================================================
TOKEN_CLASSES: list[str] = ["filler", "structure", "random", "recall", "arith"]
"""Per-token difficulty classes; class id = index, -1 = unknown (real text).

filler: predictable filler phrases; structure: syntax words and EOS (fully predictable from context);
random: uniformly drawn content (keys, values being set, operands): irreducible, no model can learn it;
recall: a value recalled for a key set earlier in the document (needs long-range lookup);
arith: the result of a multi-step arithmetic problem (needs computation)."""
FILLER, STRUCTURE, RANDOM, RECALL, ARITH = range(5)
UNKNOWN_CLASS = -1

EOS, UNK = "<eos>", "<unk>"
_STRUCTURE_WORDS = ["set", "to", "get", "is", "calc", "=", "."]
_OPS = ["+", "-", "*"]
N_KEYS, N_VALUES, N_NUMBERS, N_OPERAND = 64, 64, 100, 10
_FILLER_WORDS = (
    "the a an this that one some many every other old new big small long short good bad red blue green "
    "dark bright quiet loud fast slow warm cold cat dog bird fish tree river hill house road city field "
    "stone cloud rain wind sun moon star book door window garden child friend teacher farmer walks runs "
    "sees finds holds keeps brings makes takes gives likes reads near under over behind beside across "
    "and but with from into on in at of by for then again today always never often"
).split()
SYNTHETIC_VOCAB: list[str] = (
    [EOS, UNK]
    + _STRUCTURE_WORDS
    + _OPS
    + [f"k{i}" for i in range(N_KEYS)]
    + [f"v{i}" for i in range(N_VALUES)]
    + [str(i) for i in range(N_NUMBERS)]
    + _FILLER_WORDS
)
"""The synthetic tokenizer's vocabulary: token id = index (EOS = 0)."""
_WORD_ID = {w: i for i, w in enumerate(SYNTHETIC_VOCAB)}
assert len(_WORD_ID) == len(SYNTHETIC_VOCAB) <= 512, "synthetic vocabulary words must be unique"
_W = {w: _WORD_ID[w] for w in _STRUCTURE_WORDS + _OPS}
_KEY0, _VAL0, _NUM0 = _WORD_ID["k0"], _WORD_ID["v0"], _WORD_ID["0"]


def _make_filler_phrases(n: int = 64) -> tuple[list[list[int]], list[int]]:
    """Fixed phrases (3-6 filler words) and a fixed successor per phrase: filler runs follow the chain."""
    rng = random.Random(20240601)
    fill = [_WORD_ID[w] for w in _FILLER_WORDS]
    phrases = [[rng.choice(fill) for _ in range(rng.randint(3, 6))] for _ in range(n)]
    succ = list(range(n))
    rng.shuffle(succ)
    return phrases, succ


_PHRASES, _PHRASE_NEXT = _make_filler_phrases()


@dataclass(frozen=True)
class _SynKnobs:
    doc_words: int = 256
    kv_frac: float = 0.3
    arith_frac: float = 0.2
    arith_steps: int = 3

    @classmethod
    def from_config(cls, cfg: DataConfig) -> _SynKnobs:
        return cls(cfg.syn_doc_words, cfg.syn_kv_frac, cfg.syn_arith_frac, cfg.syn_arith_steps)


def _synthetic_doc(seed: int, index: int, k: _SynKnobs) -> tuple[list[int], list[int]]:
    """Document `index` of the corpus `seed` as (synthetic token ids, class per token); no EOS."""
    rng = random.Random(f"mor-bench/{seed}/{index}")
    rand, randint = rng.random, rng.randrange
    ids: list[int] = []
    cls: list[int] = []
    target = randint(k.doc_words // 2, k.doc_words * 3 // 2 + 1)
    values: dict[int, int] = {}  # key -> value, for keys set in this document
    free_keys = list(range(N_KEYS))
    set_w, to_w, get_w, is_w, calc_w, eq_w, dot_w = (_W[w] for w in _STRUCTURE_WORDS)
    S, R = STRUCTURE, RANDOM
    while len(ids) < target:
        u = rand()
        if u < k.kv_frac:
            if values and (not free_keys or rand() < 0.5):  # recall: get <key> is <value> .
                key = rng.choice(list(values))
                ids += (get_w, _KEY0 + key, is_w, _VAL0 + values[key], dot_w)
                cls += (S, R, S, RECALL, S)
            else:  # set <key> to <value> .
                key = free_keys.pop(randint(len(free_keys)))
                values[key] = randint(N_VALUES)
                ids += (set_w, _KEY0 + key, to_w, _VAL0 + values[key], dot_w)
                cls += (S, R, S, R, S)
        elif u < k.kv_frac + k.arith_frac:  # calc a op b op c ... = result .  (left to right, mod 100)
            acc = randint(N_OPERAND)
            ids += (calc_w, _NUM0 + acc)
            cls += (S, R)
            for _ in range(1 + randint(k.arith_steps)):
                op, x = randint(3), randint(N_OPERAND)
                acc = (acc + x if op == 0 else acc - x if op == 1 else acc * x) % N_NUMBERS
                ids += (_W[_OPS[op]], _NUM0 + x)
                cls += (R, R)
            ids += (eq_w, _NUM0 + acc, dot_w)
            cls += (S, ARITH, S)
        else:  # filler: a chain of 1-3 fixed phrases, then "."
            p = randint(len(_PHRASES))
            for _ in range(1 + randint(3)):
                ids += _PHRASES[p]
                p = _PHRASE_NEXT[p]
            ids.append(dot_w)
            cls += [FILLER] * (len(ids) - len(cls))
    return ids, cls


def synthetic_text(ids: Iterable[int]) -> str:
    """Synthetic token ids -> text (words joined by single spaces)."""
    return " ".join(SYNTHETIC_VOCAB[i] for i in ids)


def synthetic_documents(
    seed: int,
    n: int | None = None,
    *,
    start: int = 0,
    doc_words: int = 256,
    kv_frac: float = 0.3,
    arith_frac: float = 0.2,
    arith_steps: int = 3,
) -> Iterator[tuple[str, list[int]]]:
    """Yield `(text, token_classes)` for documents `start, start+1, ...` (`n` of them, or forever).

    `token_classes[j]` is the `TOKEN_CLASSES` index of the j-th synthetic token (= whitespace-separated
    word) of `text`; the EOS that the loader appends after each document has class "structure". The
    loader's validation split is documents `0 .. data.val_docs-1`, training the ones after.
    """
    knobs = _SynKnobs(doc_words, kv_frac, arith_frac, arith_steps)
    stop = None if n is None else start + n
    i = start
    while stop is None or i < stop:
        ids, cls = _synthetic_doc(seed, i, knobs)
        yield synthetic_text(ids), cls
        i += 1


# ==========================================================================================================
# Tokenizers
# ==========================================================================================================
_EOS_CANDIDATES = ("<eos>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "[SEP]")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its document separator (EOS) and a name.

    `encode` adds no special tokens (the loader adds EOS between documents itself)."""

    def __init__(self, backend: _HFTokenizer, name: str, eos_token: str | None = None):
        self.backend = backend
        self.name = name
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        if eos_id is None:
            eos_id = next(
                (backend.token_to_id(t) for t in _EOS_CANDIDATES if backend.token_to_id(t) is not None), None
            )
        if eos_id is None:
            specials = [t for t in backend.get_added_tokens_decoder().values() if t.special]
            if not specials:
                raise ValueError(f"tokenizer {name!r} has no EOS / special token to separate documents")
            eos_id = backend.token_to_id(specials[0].content)
        self.eos_id: int = int(eos_id)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._synthetic: bool | None = None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor | np.ndarray):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def is_synthetic(self) -> bool:
        """True when token ids are exactly `SYNTHETIC_VOCAB` indices (the loader then skips tokenization)."""
        if self._synthetic is None:
            self._synthetic = self.vocab_size == len(SYNTHETIC_VOCAB) and self.backend.get_vocab() == _WORD_ID
        return self._synthetic

    def save(self, path: str | Path) -> Path:
        """Write one `tokenizer.json` (atomically); `path` is that file or a directory to hold it."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        _atomic_write_text(path, self.backend.to_str())
        return path

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> Tokenizer:
        """Load a `tokenizer.json` (or a directory holding one) written by `save` or by `transformers`."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        tok = cls(_HFTokenizer.from_file(str(path)), name or f"file:{path}", _eos_from_tokenizer_config(path))
        if name is None and tok.is_synthetic:
            tok.name = "synthetic"
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def synthetic_tokenizer() -> Tokenizer:
    """Word-level tokenizer over `SYNTHETIC_VOCAB` (whitespace split); fully offline and deterministic."""
    tk = _HFTokenizer(models.WordLevel(dict(_WORD_ID), unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([EOS, UNK])
    return Tokenizer(tk, "synthetic", EOS)


def _parse_tokenizer_spec(spec: str) -> tuple[str, str]:
    allowed = "allowed: synthetic, hf:<name-or-dir>, train:<vocab_size>"
    if spec == "synthetic":
        return "synthetic", ""
    kind, _, arg = str(spec).partition(":")
    if kind == "hf" and arg:
        return kind, arg
    if kind == "train":
        if not re.fullmatch(r"\d+", arg) or int(arg) < 258:
            raise ValueError(
                f"data.tokenizer={spec!r}: train:<vocab_size> needs an integer vocab_size >= 258 "
                "(256 byte tokens + <eos> + at least one merge)"
            )
        return kind, arg
    raise ValueError(f"data.tokenizer={spec!r} is invalid: {allowed}")


def _hub_offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _eos_from_tokenizer_config(tokenizer_json: Path) -> str | None:
    conf = tokenizer_json.parent / "tokenizer_config.json"
    if not conf.exists():
        return None
    eos = json.loads(conf.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _load_hf_tokenizer(name: str, spec: str) -> Tokenizer:
    local = Path(name).expanduser()
    if local.is_file() or (local.is_dir() and (local / "tokenizer.json").exists()):
        return Tokenizer.from_file(local, name=spec)
    from transformers import AutoTokenizer  # heavy import; only for hub names / transformers-style dirs

    errors = []
    for local_only in (True, False) if not _hub_offline() else (True,):
        try:
            hf = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        except Exception as e:  # noqa: BLE001 - any failure becomes one config error below
            errors.append(f"{type(e).__name__}: {e}")
            continue
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"data.tokenizer={spec!r}: {name} has no fast (tokenizers) backend")
        return Tokenizer(backend, spec, hf.eos_token)
    raise ValueError(
        f"data.tokenizer={spec!r} could not be loaded (not a local tokenizer.json/dir, not in the HF cache"
        f"{', and offline mode is on' if _hub_offline() else ', and the hub is unreachable'}): "
        f"{errors[-1][:300]}"
    )


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`: synthetic, hf:<name-or-dir>, or train:<vocab_size>.

    `train:<n>` trains a byte-level BPE with `tokenizers` on the first `data.tokenizer_train_docs`
    training documents (never validation ones) and caches it under `data.cache_dir/tokenizers/`, keyed by
    everything that determines those documents; later calls load the cached file."""
    validate_config(cfg)
    kind, arg = _parse_tokenizer_spec(cfg.tokenizer)
    if kind == "synthetic":
        return synthetic_tokenizer()
    if kind == "hf":
        return _load_hf_tokenizer(arg, cfg.tokenizer)
    vocab_size = int(arg)
    key = _corpus_fingerprint(cfg) | {"vocab_size": vocab_size, "train_docs": cfg.tokenizer_train_docs}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.cache_dir) / "tokenizers" / f"bpe{vocab_size}-{digest}" / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(path, name=cfg.tokenizer)
    tok = Tokenizer(_train_bpe(_training_texts(cfg), vocab_size), cfg.tokenizer, EOS)
    tok.save(path)
    _atomic_write_text(path.parent / "source.json", json.dumps(key, indent=1, sort_keys=True))
    return tok


def _train_bpe(texts: Iterator[str], vocab_size: int) -> _HFTokenizer:
    tk = _HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=not _quiet(),
    )
    tk.train_from_iterator(texts, trainer)
    return tk


def _training_texts(cfg: DataConfig) -> Iterator[str]:
    corpus = _make_corpus(cfg)
    for _, _, raw in islice(corpus.train_docs(0, 0), cfg.tokenizer_train_docs):
        yield raw if isinstance(raw, str) else synthetic_text(raw[0])


# ==========================================================================================================
# Corpora: raw documents per split and epoch
# ==========================================================================================================
RawDoc = str | tuple[list[int], list[int]]  # text, or synthetic (token ids, classes)
DocStream = Iterator[tuple[int, int, RawDoc]]  # (epoch, doc position within the epoch, document)


class _Corpus:
    """Documents of one split in their global order; every rank reads all of them (see Sharding above)."""

    def train_docs(self, epoch: int, start: int) -> DocStream:
        """Training documents from position `start` of `epoch` on, continuing into later epochs."""
        raise NotImplementedError

    def val_docs(self) -> DocStream:
        raise NotImplementedError


class _SyntheticCorpus(_Corpus):
    def __init__(self, cfg: DataConfig):
        self.seed, self.n_val, self.knobs = cfg.seed, cfg.val_docs, _SynKnobs.from_config(cfg)

    def train_docs(self, epoch, start):
        k = start
        while True:  # one infinite epoch: document val_docs + k
            yield 0, k, _synthetic_doc(self.seed, self.n_val + k, self.knobs)
            k += 1

    def val_docs(self):
        for i in range(self.n_val):
            yield 0, i, _synthetic_doc(self.seed, i, self.knobs)


class _IndexedCorpus(_Corpus):
    """A map-style `datasets.Dataset` with a "text" column: seeded held-out set, per-epoch permutation."""

    _CHUNK = 256

    def __init__(self, ds, cfg: DataConfig, what: str):
        n = len(ds)
        if cfg.val_docs >= n:
            raise ValueError(f"data.val_docs={cfg.val_docs} must be smaller than the {n} documents in {what}")
        self.ds, self.seed = ds, cfg.seed
        rng = np.random.default_rng([cfg.seed, 1])
        self.val_idx = (
            np.sort(rng.choice(n, size=cfg.val_docs, replace=False)) if cfg.val_docs else np.zeros(0, int)
        )
        mask = np.ones(n, bool)
        mask[self.val_idx] = False
        self.train_idx = np.flatnonzero(mask)

    def _texts(self, idx: np.ndarray, epoch: int, start: int) -> DocStream:
        for c in range(start, len(idx), self._CHUNK):
            texts = [t or "" for t in self.ds[idx[c : c + self._CHUNK].tolist()]["text"]]
            for j, t in enumerate(texts):
                yield epoch, c + j, t

    def train_docs(self, epoch, start):
        while True:
            perm = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.train_idx))
            yield from self._texts(self.train_idx[perm], epoch, start)
            epoch, start = epoch + 1, 0

    def val_docs(self):
        yield from self._texts(self.val_idx, 0, 0)


class _StreamingCorpus(_Corpus):
    """A streaming `datasets.IterableDataset`: the first `val_docs` documents are held out; the rest are
    read through a seeded shuffle buffer (reseeded each epoch). Resuming re-reads and skips documents."""

    BUFFER = 10_000

    def __init__(self, ds, cfg: DataConfig):
        self.ds, self.seed, self.n_val, self.field = ds, cfg.seed, cfg.val_docs, cfg.text_field

    def _stream(self) -> Iterator[str]:
        for ex in self.ds:
            if self.field not in ex:
                raise ValueError(f"data.text_field={self.field!r} is not a column of {list(ex)}")
            yield ex[self.field] or ""

    def train_docs(self, epoch, start):
        while True:
            docs = _buffer_shuffle(
                islice(self._stream(), self.n_val, None), random.Random(f"{self.seed}/{epoch}")
            )
            any_doc = False
            for k, t in enumerate(docs):
                any_doc = True
                if k >= start:
                    yield epoch, k, t
            if not any_doc:
                raise ValueError(
                    f"the streamed split holds no training documents after data.val_docs={self.n_val}"
                )
            epoch, start = epoch + 1, 0

    def val_docs(self):
        for k, t in enumerate(islice(self._stream(), self.n_val)):
            yield 0, k, t


def _buffer_shuffle(
    it: Iterator[Any], rng: random.Random, size: int = _StreamingCorpus.BUFFER
) -> Iterator[Any]:
    buf: list[Any] = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def _local_files(cfg: DataConfig) -> dict[str, list[str]]:
    """text_files: builder name -> sorted files matched by `data.paths`."""
    if not cfg.paths:
        raise ValueError("data.paths is required for data.source=text_files (a glob, e.g. data/*.jsonl)")
    files = sorted(f for f in glob.glob(os.path.expanduser(cfg.paths), recursive=True) if os.path.isfile(f))
    if not files:
        raise ValueError(f"data.paths={cfg.paths!r} matched no files")
    groups: dict[str, list[str]] = {}
    for f in files:
        ext = Path(f).suffix.lower()
        if ext not in FILE_BUILDERS:
            raise ValueError(
                f"data.paths={cfg.paths!r} matched {f}, whose type {ext or '(none)'} is not one of "
                f"{', '.join(FILE_BUILDERS)}"
            )
        groups.setdefault(FILE_BUILDERS[ext], []).append(os.path.abspath(f))
    return groups


def _text_column(ds, field: str, what: str):
    if field not in ds.column_names:
        raise ValueError(f"data.text_field={field!r} is not a column of {what} (columns: {ds.column_names})")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def _make_corpus(cfg: DataConfig) -> _Corpus:
    if cfg.source == "synthetic":
        return _SyntheticCorpus(cfg)
    import datasets  # heavy import, only for file/hf sources

    if _quiet():
        datasets.disable_progress_bars()
    if cfg.source == "text_files":
        parts = []
        for builder, files in _local_files(cfg).items():
            kw = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(
                builder,
                data_files=files,
                split="train",
                cache_dir=str(Path(cfg.cache_dir) / "datasets"),
                **kw,
            )
            parts.append(
                _text_column(ds, "text" if builder == "text" else cfg.text_field, f"{builder} files")
            )
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return _IndexedCorpus(ds, cfg, f"data.paths={cfg.paths!r}")
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=cfg.hf_streaming)
    except Exception as e:  # noqa: BLE001 - name the keys, keep the cause
        raise ValueError(
            f"data.hf_name={cfg.hf_name!r} (data.hf_config={cfg.hf_config!r}, "
            f"data.hf_split={cfg.hf_split!r}) could not be loaded: {type(e).__name__}: {e}"
        ) from e
    if cfg.hf_streaming:
        return _StreamingCorpus(ds, cfg)
    return _IndexedCorpus(_text_column(ds, cfg.text_field, cfg.hf_name), cfg, f"data.hf_name={cfg.hf_name!r}")


def _corpus_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """Everything that determines the training documents (cache key for trained tokenizers)."""
    fp: dict[str, Any] = {"source": cfg.source, "seed": cfg.seed, "val_docs": cfg.val_docs}
    if cfg.source == "synthetic":
        fp["knobs"] = vars(_SynKnobs.from_config(cfg))
    elif cfg.source == "text_files":
        fp["text_field"] = cfg.text_field
        fp["files"] = [
            (f, os.path.getsize(f), os.path.getmtime(f)) for fs in _local_files(cfg).values() for f in fs
        ]
    else:
        fp |= {k: getattr(cfg, k) for k in ("hf_name", "hf_config", "hf_split", "hf_streaming", "text_field")}
    return fp


# ==========================================================================================================
# Packing and loading
# ==========================================================================================================
class _Encoder:
    """Raw documents -> (token ids + EOS, class per token) int64 arrays; empty documents are dropped."""

    CHUNK = 128

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_id

    def __call__(self, docs: DocStream) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        last_tokens_epoch = None  # epoch of the last document that had tokens
        while chunk := list(islice(docs, self.CHUNK)):
            for item in self._encode(chunk):
                last_tokens_epoch = item[0]
                yield item
            if chunk[-1][0] >= (chunk[0][0] if last_tokens_epoch is None else last_tokens_epoch) + 2:
                raise ValueError(
                    "two consecutive epochs of the training documents hold no tokens (empty docs?)"
                )

    def _encode(self, chunk):
        if self.tok.is_synthetic and not isinstance(chunk[0][2], str):
            for e, d, (ids, cls) in chunk:
                if ids:
                    yield e, d, np.array([*ids, self.eos], np.int64), np.array([*cls, STRUCTURE], np.int64)
            return
        texts = [raw if isinstance(raw, str) else synthetic_text(raw[0]) for _, _, raw in chunk]
        for (e, d, raw), enc in zip(chunk, self.tok.backend.encode_batch(texts, add_special_tokens=False)):
            if not enc.ids:
                continue
            ids = np.array([*enc.ids, self.eos], np.int64)
            if isinstance(raw, str):
                cls = np.full(len(ids), UNKNOWN_CLASS, np.int64)
            else:  # synthetic text through another tokenizer: a token takes the class of its last char's word
                word_cls = raw[1]
                starts = np.cumsum([0] + [len(SYNTHETIC_VOCAB[i]) + 1 for i in raw[0][:-1]])
                ends = np.array([max(a, b - 1) for a, b in enc.offsets])
                w = np.clip(np.searchsorted(starts, ends, side="right") - 1, 0, len(word_cls) - 1)
                cls = np.append(np.asarray(word_cls, np.int64)[w], STRUCTURE)
            yield e, d, ids, cls


class _TokenStream:
    """Concatenated (ids, classes) of a document stream, read at a resumable (epoch, doc, offset)."""

    def __init__(self, docs_from: Callable[[int, int], Iterator[tuple[int, int, np.ndarray, np.ndarray]]]):
        self._docs_from = docs_from
        self.seek(0, 0, 0)

    def seek(self, epoch: int, doc: int, offset: int) -> None:
        self.epoch, self.doc, self.offset = epoch, doc, offset
        self._it = self._docs_from(epoch, doc)
        self._buf: deque = deque()
        self._avail = 0  # tokens in _buf

    def _fill(self, n: int) -> bool:
        while self._avail - self.offset < n:
            item = next(self._it, None)
            if item is None:
                return False
            self._buf.append(item)
            self._avail += len(item[2])
            if len(self._buf) == 1:  # anchor the position on the first document actually present
                self.epoch, self.doc = item[0], item[1]
        return True

    def available(self) -> int:
        self._fill(1 << 62)
        return self._avail - self.offset

    def take(self, n: int, advance: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The next `n` tokens, then move forward `advance` (< n) tokens; None if fewer than n remain."""
        if not self._fill(n):
            return None
        ids, cls, got, off = [], [], 0, self.offset
        for _, _, a, c in self._buf:
            piece = min(len(a) - off, n - got)
            ids.append(a[off : off + piece])
            cls.append(c[off : off + piece])
            got, off = got + piece, 0
            if got == n:
                break
        self.offset += advance
        while self.offset >= len(self._buf[0][2]):
            _, _, a, _ = self._buf.popleft()
            self.offset -= len(a)
            self._avail -= len(a)
        self.epoch, self.doc = self._buf[0][0], self._buf[0][1]
        return np.concatenate(ids), np.concatenate(cls)


class PackedLoader:
    """Batches of packed sequences: `{"input_ids", "labels", "token_class"}`, each LongTensor[B, T].

    split="train": infinite; iterating continues from the current position, and `state_dict()` /
    `load_state_dict()` save and restore it exactly. split="val": the same finite list of batches on every
    iteration (the last one may hold fewer rows, or none for a rank past the end of the last global batch).
    Rank `rank` of `world` gets rows `[rank*B, (rank+1)*B)` of each global batch of `B*world` rows."""

    def __init__(
        self, cfg: DataConfig, tokenizer: Tokenizer, split: str, batch_size: int, rank: int, world: int
    ):
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, cfg.seq_len, rank, world
        self._corpus = _make_corpus(cfg)
        self._encode = _Encoder(tokenizer)
        if split == "train":
            self._stream = _TokenStream(lambda e, d: self._encode(self._corpus.train_docs(e, d)))
        self.batches_served = 0

    def _batch(self, ids: np.ndarray, cls: np.ndarray, first: int, rows: int) -> dict[str, torch.Tensor]:
        """Rows `[first, first+rows)` of the global batch held in the stream span `ids` (classes `cls`)."""
        T = self.seq_len
        ids, cls = ids[first * T : (first + rows) * T + 1], cls[first * T : (first + rows) * T + 1]
        return {
            "input_ids": torch.from_numpy(ids[: rows * T].reshape(rows, T)),
            "labels": torch.from_numpy(ids[1 : rows * T + 1].reshape(rows, T)),
            "token_class": torch.from_numpy(cls[1 : rows * T + 1].reshape(rows, T)),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, T = self.batch_size, self.seq_len
        G, first = B * self.world_size, B * self.rank  # global rows per batch; this rank's first row
        if self.split == "val":
            stream = _TokenStream(lambda e, d: self._encode(self._corpus.val_docs()))
            produced = False
            while (got := stream.take(G * T + 1, G * T)) is not None:
                produced = True
                yield self._batch(*got, first, B)
            rows = (stream.available() - 1) // T
            if rows > 0:
                got = stream.take(rows * T + 1, rows * T)
                if rows > first:
                    yield self._batch(*got, first, min(B, rows - first))
            elif not produced:
                raise ValueError(
                    f"data.val_docs={self.cfg.val_docs} hold out fewer than data.seq_len+1={T + 1} tokens"
                )
            return
        while True:
            got = self._stream.take(G * T + 1, G * T)
            self.batches_served += 1
            yield self._batch(*got, first, B)

    def state_dict(self) -> dict[str, int]:
        """Position of the next global batch (plain ints, JSON-serializable; equal on every rank)."""
        if self.split != "train":
            return {"epoch": 0, "doc": 0, "offset": 0, "batches": 0}
        s = self._stream
        return {"epoch": s.epoch, "doc": s.doc, "offset": s.offset, "batches": self.batches_served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.split != "train":
            return
        self._stream.seek(int(state["epoch"]), int(state["doc"]), int(state["offset"]))
        self.batches_served = int(state.get("batches", 0))


def build_loader(
    cfg: DataConfig, tokenizer: Tokenizer, split: str, batch_size: int, rank: int = 0, world_size: int = 1
) -> PackedLoader:
    """Packed-sequence loader for `split` ("train": infinite, resumable; "val": fixed finite batches).

    Rank `rank` of `world_size` gets rows `[rank*batch_size, (rank+1)*batch_size)` of every global batch of
    `batch_size*world_size` rows: disjoint, deterministic, and together the batches of one process with
    `batch_size*world_size` rows (see the module docstring, Sharding)."""
    validate_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed {', '.join(SPLITS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if split == "val" and cfg.val_docs < 1:
        raise ValueError(f"data.val_docs={cfg.val_docs} holds out no validation documents")
    return PackedLoader(cfg, tokenizer, split, batch_size, rank, world_size)


def measure_loader_throughput(loader: Iterable[dict[str, torch.Tensor]], n_batches: int = 20) -> float:
    """Tokens (input_ids elements) per second over the next `n_batches` batches; consumes them."""
    it = iter(loader)
    tokens = 0
    t0 = time.perf_counter()
    for _, batch in zip(range(n_batches), it):
        tokens += batch["input_ids"].numel()
    return tokens / max(time.perf_counter() - t0, 1e-9)


# ==========================================================================================================
# Small helpers
# ==========================================================================================================
def _quiet() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "DataConfig",
    "PackedLoader",
    "SYNTHETIC_VOCAB",
    "TOKEN_CLASSES",
    "Tokenizer",
    "build_loader",
    "load_tokenizer",
    "measure_loader_throughput",
    "synthetic_documents",
    "synthetic_text",
    "synthetic_tokenizer",
    "validate_config",
]
