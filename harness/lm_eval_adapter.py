"""lm-eval model `mor`: scores any MoR Bench model (vanilla, recursive, MoR) with lm-evaluation-harness.

Only the model side lives here; lm-eval owns tasks, prompts, few-shot sampling and metrics.

Python::

    from harness.lm_eval_adapter import MoRLM
    lm = MoRLM(pretrained="results/runs/demo/model=mor_expert", routing="threshold")
    lm = MoRLM.from_model(model, tokenizer, batch_size=32)       # objects already in memory
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"])

Command line. lm-eval finds models in its registry, and `@register_model("mor")` runs only when
this module is imported, so call lm-eval's own CLI through this module (same arguments)::

    python -m harness.lm_eval_adapter run --model mor \
        --model_args pretrained=results/runs/demo/model=mor_expert,routing=threshold --tasks piqa

or point a console script at `harness.lm_eval_adapter:cli_main` (e.g. `mor-lm-eval = ...` in
pyproject), which imports the registration and delegates to `lm_eval.__main__.cli_evaluate`.

Model arguments: `pretrained` (run directory), `step` (checkpoint; default latest), `batch_size`,
`device`, `dtype` (float32|bfloat16|float16), `routing` (expert-choice inference rule override:
threshold | aux_router | topk), `shared_prefix`, `max_length` (default model.max_seq_len),
`max_gen_toks`.

How requests are scored:

* `loglikelihood`: requests longer than `max_length + 1` tokens are truncated from the left as
  HFLM does; `truncated_requests` counts them (also logged and in `get_model_info()`). Batches
  are length-sorted and right-padded: every causal model ignores what follows a token, so padding
  never leaks into a request. Routed models must therefore be causal: expert-choice uses the
  model's configured inference rule (a causal one by default). `routing=topk` (the paper's
  training rule, not causal) is allowed, but then each request runs alone in its own row without
  padding or cache, and `causal` reports False.
* Shared prefixes (`shared_prefix=True`): requests with the same context (the choices of one
  multiple-choice question, or the same few-shot prompt) run the context once into a KV cache
  and score every continuation from copies of it (`KVCache.select`); a batch of contexts of
  unequal length is prefilled together and its right padding hidden (`KVCache.forget_from`).
  Results equal scoring each request on its own (tested to 1e-5 for every family).
* `loglikelihood_rolling`: disjoint rolling windows of `max_length` tokens, as HFLM.
* `generate_until`: greedy decoding with the model's static KV cache, stopping at the stop
  sequences, at EOS, or after `max_gen_toks` tokens; contexts are left-truncated to leave room.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # `python -m harness.lm_eval_adapter`: one module object, one registration
    sys.modules.setdefault("harness.lm_eval_adapter", sys.modules[__name__])

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from models import ConfigError

log = logging.getLogger("mor.eval")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quiet() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true")


def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


@register_model("mor")
class MoRLM(TemplateLM):
    """lm-eval `TemplateLM` over a MoR Bench model; see the module docstring."""

    backend = "causal"

    def __init__(
        self,
        pretrained: str | None = None,
        step: int | None = None,
        batch_size: int | str = 32,
        device: str | None = "cpu",
        routing: str | None = None,
        shared_prefix: bool = True,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        max_batch_size: int | None = None,  # passed by lm-eval's CLI; unused (no auto batch size)
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise TypeError(
                f"mor model got unknown arguments {sorted(unused)}: allowed pretrained, step, batch_size, "
                "device, routing, shared_prefix, max_length, max_gen_toks, dtype"
            )
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.step = step
        self.run_dir: Path | None = None
        if model is None:
            if pretrained is None:
                raise ConfigError("mor model needs pretrained=<run directory> (or use MoRLM.from_model)")
            from .records import load_run

            run = load_run(pretrained, step=step, device=str(self._device))
            model, tokenizer, self.step, self.run_dir = run.model, run.tokenizer, run.step, Path(run.run_dir)
        if tokenizer is None:
            raise ConfigError("mor model needs a tokenizer")
        if dtype is not None:
            if dtype not in _DTYPES:
                raise ConfigError(f"dtype={dtype!r} is invalid: allowed {', '.join(_DTYPES)}")
            model = model.to(_DTYPES[dtype])
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        if isinstance(batch_size, str):
            if batch_size.startswith("auto"):
                log.warning("batch_size=%s is not supported by the mor model; using 32", batch_size)
                batch_size = 32
            batch_size = int(batch_size)
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self._batch_size = batch_size
        if isinstance(shared_prefix, str):  # from a --model_args string
            shared_prefix = shared_prefix.strip().lower() not in ("false", "0", "no")
        self.shared_prefix = bool(shared_prefix)
        self._max_gen_toks = int(max_gen_toks)
        ctx = self.model.cfg.max_seq_len
        if max_length is not None and not 1 <= int(max_length) <= ctx:
            raise ConfigError(f"max_length={max_length} must be within [1, model.max_seq_len={ctx}]")
        self._max_length = int(max_length or ctx)
        self.routing = self._check_routing(routing)
        self.truncated_requests = 0  # requests cut from the left to fit max_length (all calls)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> MoRLM:
        """Wrap an in-memory model and tokenizer (harness.data.Tokenizer API); kwargs as __init__."""
        kwargs.setdefault("device", str(next(model.parameters()).device))
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    # -- routing -------------------------------------------------------------------------------
    def _check_routing(self, routing: str | None) -> str | None:
        router = getattr(self.model, "router", None)
        if routing is None:
            return None
        from models.routers.expert_choice import INFERENCE_RULES

        if router is None or router.kind != "expert":
            raise ConfigError(
                f"routing={routing!r} overrides the expert-choice inference rule, but this model "
                f"({self.model.cfg.family}, {getattr(router, 'kind', 'no')} router) has none: leave it null"
            )
        if routing not in INFERENCE_RULES:
            raise ConfigError(f"routing={routing!r} is invalid: allowed {', '.join(INFERENCE_RULES)}")
        if routing == "aux_router" and not hasattr(router, "aux_scorers"):
            raise ConfigError(
                "routing=aux_router needs a model trained with model.router.aux_loss=aux_router"
            )
        return routing

    @property
    def routing_rule(self) -> str:
        """Label of the routing used: the expert-choice rule, 'token_choice', or 'none' (no router)."""
        router = getattr(self.model, "router", None)
        if router is None:
            return "none"
        if router.kind != "expert":
            return self.model.routing_rule
        return self.routing or router.cfg.inference

    @property
    def causal(self) -> bool:
        from models.routers.expert_choice import CAUSAL_RULES

        router = getattr(self.model, "router", None)
        return router is None or router.kind != "expert" or self.routing_rule in CAUSAL_RULES

    @contextmanager
    def routing_context(self):
        """Inside: eval mode, no grad, and the routing override set on the router (restored on exit)."""
        router = getattr(self.model, "router", None)
        old = getattr(router, "rule", None)
        if self.routing is not None:
            router.rule = self.routing
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if self.routing is not None:
                router.rule = old
            self.model.train(was)

    # -- TemplateLM plumbing -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int] | int) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else list(tokens))

    def get_model_info(self) -> dict:
        cfg = self.model.cfg
        return {
            "mor_family": cfg.family,
            "mor_routing": self.routing_rule,
            "mor_causal": self.causal,
            "mor_shared_prefix": self.shared_prefix,
            "mor_step": self.step,
            "mor_run_dir": str(self.run_dir) if self.run_dir else None,
            "mor_max_length": self.max_length,
            "mor_truncated_requests": self.truncated_requests,
        }

    def _note_truncated(self, n: int, total: int, what: str) -> None:
        if n:
            self.truncated_requests += n
            log.warning(
                "%d of %d %s requests were truncated from the left to fit max_length=%d (%d so far)",
                n,
                total,
                what,
                self.max_length,
                self.truncated_requests,
            )

    # -- scoring -------------------------------------------------------------------------------
    def _pad(self, seqs: list[list[int]]) -> torch.Tensor:
        T = max(len(s) for s in seqs)
        pad = self.eot_token_id
        return torch.tensor([s + [pad] * (T - len(s)) for s in seqs], dtype=torch.long, device=self.device)

    def _positions(self, starts: list[int], targets: list[list[int]]) -> torch.Tensor:
        """[B, k] positions starts[i] + j (j < len(targets[i])), right-padded by repeating the last."""
        k = max(len(t) for t in targets)
        return torch.tensor(
            [[s + min(j, len(t) - 1) for j in range(k)] for s, t in zip(starts, targets)], device=self.device
        )

    def _score_rows(self, logits: torch.Tensor, rows: list[int], starts: list[int], targets: list[list[int]]):
        """Per-token log-probs of targets[i] read at logits[rows[i], starts[i] + j]: (log-probs, greedy?)."""
        r = torch.tensor([row for row, t in zip(rows, targets) for _ in t], device=logits.device)
        p = torch.tensor(
            [s + j for s, t in zip(starts, targets) for j in range(len(t))], device=logits.device
        )
        tgt = torch.tensor([x for t in targets for x in t], device=logits.device)
        sel = logits[r, p].float()
        lp = F.log_softmax(sel, -1).gather(1, tgt[:, None]).squeeze(1).double().cpu()
        hit = (sel.argmax(-1) == tgt).cpu()
        out, i = [], 0
        for t in targets:
            out.append((lp[i : i + len(t)], hit[i : i + len(t)]))
            i += len(t)
        return out

    def _score_plain(self, items: list[tuple[list[int], list[int]]], batch_size: int, pbar) -> list:
        """Score (context, continuation) pairs as right-padded batches of context + continuation[:-1]."""
        res: list = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        for chunk in _batches(order, batch_size):
            inps = [(items[i][0] + items[i][1])[:-1] for i in chunk]
            conts = [items[i][1] for i in chunk]
            starts = [len(x) - len(c) for x, c in zip(inps, conts)]
            logits = self.model(self._pad(inps), logits_index=self._positions(starts, conts)).logits
            zeros = [0] * len(chunk)
            for i, (lp, hit) in zip(chunk, self._score_rows(logits, list(range(len(chunk))), zeros, conts)):
                res[i] = (lp, hit)
            pbar.update(len(chunk))
        return res

    def _score_shared(self, items: list[tuple[list[int], list[int]]], pbar) -> list:
        """Score pairs grouped by context: each context runs once, its continuations from cache copies."""
        res: list = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(items):
            groups[tuple(ctx)].append(i)
        keys = sorted(groups, key=len, reverse=True)
        L, bs = self.max_length, self.batch_size
        batch: list[tuple[int, ...]] = []
        kmax = 0

        def flush():
            if batch:
                self._run_shared(batch, groups, items, res, pbar)
            batch.clear()

        for key in keys:
            k = max(len(items[i][1]) for i in groups[key])
            # contexts are sorted longest first: the first one sets the padded prefill width, and
            # every continuation of the batch is fed after it (the model checks seen + T <= L)
            if batch and (len(batch) >= bs or len(batch[0]) + max(kmax, k) - 1 > L):
                flush()
                kmax = 0
            batch.append(key)
            kmax = max(kmax, k)
        flush()
        return res

    def _run_shared(self, batch, groups, items, res, pbar) -> None:
        ctxs = [list(c) for c in batch]
        n = torch.tensor([len(c) for c in ctxs], device=self.device)
        N = len(ctxs[0])
        rows = [(g, i) for g, key in enumerate(batch) for i in groups[key]]
        kmax = max(len(items[i][1]) for _, i in rows)
        cache = self.model.make_cache(len(ctxs), max_len=N + max(kmax - 1, 1))
        # only each context's last position is scored here: logits for one position per row
        logits = self.model(self._pad(ctxs), cache=cache, logits_index=(n - 1)[:, None]).logits
        first = self._score_rows(
            logits, [g for g, _ in rows], [0] * len(rows), [items[i][1][:1] for _, i in rows]
        )
        for (_, i), (lp, hit) in zip(rows, first):
            res[i] = (lp, hit)
        cache.forget_from(n)
        rest = [(g, i) for g, i in rows if len(items[i][1]) > 1]
        for chunk in _batches(rest, self.batch_size):
            sub = cache.select(torch.tensor([g for g, _ in chunk], device=self.device))
            feed = [items[i][1][:-1] for _, i in chunk]
            T = max(len(f) for f in feed)
            pos = n[[g for g, _ in chunk]][:, None] + torch.arange(T, device=self.device)
            logits = self.model(self._pad(feed), cache=sub, position_ids=pos).logits
            scored = self._score_rows(
                logits, list(range(len(chunk))), [0] * len(chunk), [items[i][1][1:] for _, i in chunk]
            )
            for (_, i), (lp, hit) in zip(chunk, scored):
                res[i] = (torch.cat([res[i][0], lp]), torch.cat([res[i][1], hit]))
        pbar.update(len(rows))

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        L = self.max_length
        items: list[tuple[list[int], list[int]]] = []
        n_trunc = 0
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("loglikelihood request with an empty continuation")
            if len(cont) > L:
                raise ValueError(f"continuation of {len(cont)} tokens is longer than max_length={L}")
            whole = list(ctx) + list(cont)
            if len(whole) > L + 1:  # as HFLM: keep the last L + 1 tokens (the model sees L of them)
                n_trunc += 1
                whole = whole[-(L + 1) :]
            items.append((whole[: len(whole) - len(cont)], list(cont)))
        self._note_truncated(n_trunc, len(requests), "loglikelihood")
        # identical requests are scored once
        uniq: dict[tuple, int] = {}
        for ctx, cont in items:
            uniq.setdefault((tuple(ctx), tuple(cont)), len(uniq))
        todo = [(list(c), list(k)) for c, k in uniq]
        pbar = tqdm(total=len(todo), disable=disable_tqdm or _quiet(), desc="mor loglikelihood")
        with self.routing_context():
            if not self.causal:  # non-causal routing: one request per row, no padding, no cache
                scored = self._score_plain(todo, 1, pbar)
            elif self.shared_prefix:
                per_ctx: dict[tuple, int] = defaultdict(int)
                for ctx, _ in todo:
                    per_ctx[tuple(ctx)] += 1
                shared = [i for i, (ctx, _) in enumerate(todo) if per_ctx[tuple(ctx)] > 1]
                alone = [i for i, (ctx, _) in enumerate(todo) if per_ctx[tuple(ctx)] == 1]
                scored = [None] * len(todo)
                for idx, out in (
                    (shared, self._score_shared([todo[i] for i in shared], pbar)),
                    (alone, self._score_plain([todo[i] for i in alone], self.batch_size, pbar)),
                ):
                    for i, r in zip(idx, out):
                        scored[i] = r
            else:
                scored = self._score_plain(todo, self.batch_size, pbar)
        pbar.close()
        out = []
        for (req_str, _, _), (ctx, cont) in zip(requests, items):
            lp, hit = scored[uniq[(tuple(ctx), tuple(cont))]]
            answer = (float(lp.sum()), bool(hit.all()))
            out.append(answer)
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            toks = self.tok_encode(string)
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=toks,
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        eos = self.tok_decode(self.eot_token_id)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or _quiet(), desc="mor generate_until")
        for idx in by_kwargs.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if s]
            max_gen = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample"):
                lm_utils.warning_once(
                    log, "the mor model decodes greedily; do_sample/temperature are ignored"
                )
            max_ctx = self.max_length - max_gen
            if max_ctx < 1:
                raise ConfigError(
                    f"max_gen_toks={max_gen} leaves no room for a context in max_length={self.max_length}"
                )
            ctxs = {i: self.tok_encode(requests[i].args[0]) for i in idx}
            self._note_truncated(sum(len(c) > max_ctx for c in ctxs.values()), len(idx), "generate_until")
            ctxs = {i: (c[-max_ctx:] if c else [self.prefix_token_id]) for i, c in ctxs.items()}
            order = sorted(idx, key=lambda i: -len(ctxs[i]))
            with self.routing_context():
                for chunk in _batches(order, self.batch_size if self.causal else 1):
                    gens = self._greedy([ctxs[i] for i in chunk], max_gen, until)
                    for i, g in zip(chunk, gens):
                        text = postprocess_generated_text(self.tok_decode(g), until, None)
                        res[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    pbar.update(len(chunk))
        pbar.close()
        return res  # type: ignore[return-value]

    def _greedy(self, ctxs: list[list[int]], max_new: int, stops: list[str]) -> list[list[int]]:
        """Greedy continuation of each context until EOS, a stop string, or max_new tokens."""
        B = len(ctxs)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B

        def take(nxt: torch.Tensor) -> bool:
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                out[b].append(t)
                if t == self.eot_token_id or len(out[b]) >= max_new:
                    done[b] = True
                elif stops:
                    text = self.tok_decode(out[b])
                    done[b] = any(s in text for s in stops)
            return all(done)

        if not self.causal:  # no cache: recompute the whole (single) sequence every step
            (ctx,) = ctxs
            while not take(
                self.model(torch.tensor([ctx + out[0]], device=self.device)).logits[:, -1].argmax(-1)
            ):
                pass
            return out
        n = torch.tensor([len(c) for c in ctxs], device=self.device)
        cache = self.model.make_cache(B, max_len=int(n.max()) + max_new)
        logits = self.model(self._pad(ctxs), cache=cache).logits
        cache.forget_from(n)
        nxt = logits[torch.arange(B, device=self.device), n - 1].argmax(-1)
        step = 0
        while not take(nxt):
            pos = (n + step)[:, None]
            nxt = self.model(nxt[:, None], cache=cache, position_ids=pos).logits[:, -1].argmax(-1)
            step += 1
        return out


def bench_requests_per_s(lm: MoRLM, requests: list, kind: str = "loglikelihood", repeats: int = 1) -> float:
    """Throughput of one request kind (loglikelihood | loglikelihood_rolling | generate_until), requests/s."""
    import time

    fn = getattr(lm, kind)
    fn(requests[: min(len(requests), lm.batch_size)], disable_tqdm=True)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(requests, disable_tqdm=True)
    return repeats * len(requests) / (time.perf_counter() - t0)


def cli_main() -> None:
    """lm-eval's command line with the `mor` model registered (`python -m harness.lm_eval_adapter ...`)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    cli_main()
