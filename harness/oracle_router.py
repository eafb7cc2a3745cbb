"""Control router: depth by the token's difficulty class on the synthetic data (an oracle, not learned).

It is about the harness's synthetic language, so it lives here and not in `models/` (which never
imports the harness); configs reach it by dotted path, `model.router.name:
harness.oracle_router.OracleRouter` (conf/model/router/oracle.yaml), like any user-defined router.

Validation NLL at position t scores the *next* token, and `harness.data` labels that token with a
difficulty class (``TOKEN_CLASSES``: filler, structure, random, recall, arith). The class of the next
token is not a function of the whole context known to a router ahead of time, but it is almost a
function of the current token id: after "is" comes a recalled value, after "=" an arithmetic result,
after a filler word more filler, after "set"/"get"/"calc"/an operator a random token. The oracle uses
exactly that: each token id gets the class that most often follows it in the synthetic corpus
(measured once, at construction, on 200 training documents of the default generator; ids never seen
get "filler"). This depends on the current token only, so it is causal; it agrees with the true
class of the next token for ~91% of tokens (the misses are inherent: after "." the next segment may
be filler or a structure word, after an operand comes another operator or "=").

Depth per class (``params.depth``, recursions 1..N_r, capped at N_r; default: random 1, filler 2,
structure 2, recall 3, arith 3: irreducible tokens get the fewest recursions, long-range lookups and
multi-step arithmetic the most). The FLOPs budget uses the resulting expected fraction of tokens per depth.

Routing is token-choice's: the depth is fixed up front and the token's output is
h_1 + g * Block^d(h_1) with the gate g = alpha * p_d from a learned scorer (softmax over depths), so
the only difference from ``token_choice`` is who picks the depth. Only meaningful with
``data.tokenizer=synthetic`` (token id = index into ``SYNTHETIC_VOCAB``).

The input ids reach the router through `bind()`: a forward hook on the model's embedding records
the ids it embeds, and `plan()` reads them (the decode engine embeds each new token right before
asking `plan()` for its depth, so it works there too).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ConfigError
from models.routers.token_choice import TokenChoiceRouter

from .data import EOS, STRUCTURE, SYNTHETIC_VOCAB, TOKEN_CLASSES, synthetic_documents

DEFAULT_DEPTH = {"random": 1, "filler": 2, "structure": 2, "recall": 3, "arith": 3}
SAMPLE_DOCS = 200


@functools.cache
def next_token_class_table() -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(class id per token id, share of each token id in the sample): the class that most often
    follows each synthetic token id. Counted on the CPU, also while a model is being built on the
    meta device (mor-plan)."""
    with torch.device("cpu"):
        return _count_next_classes()


def _count_next_classes() -> tuple[tuple[int, ...], tuple[float, ...]]:
    word_id = {w: i for i, w in enumerate(SYNTHETIC_VOCAB)}
    counts = torch.zeros(len(SYNTHETIC_VOCAB), len(TOKEN_CLASSES), dtype=torch.float64)
    ids: list[int] = []
    cls: list[int] = []
    for text, c in synthetic_documents(seed=0, n=SAMPLE_DOCS, start=1_000_000):
        ids += [word_id[w] for w in text.split()] + [word_id[EOS]]
        cls += [*c, STRUCTURE]  # the loader's EOS after each document is a structure token
    cur = torch.tensor(ids[:-1])
    nxt = torch.tensor(cls[1:])
    counts.index_put_((cur, nxt), torch.ones(len(cur), dtype=torch.float64), accumulate=True)
    table = counts.argmax(1)
    table[counts.sum(1) == 0] = TOKEN_CLASSES.index("filler")
    share = counts.sum(1) / counts.sum()
    return tuple(table.tolist()), tuple(share.tolist())


class _CaptureIds:
    """Forward hook on the embedding: remembers the ids of the latest lookup on the router."""

    def __init__(self, router: OracleRouter):
        self.router = router

    def __call__(self, module, args, output) -> None:
        self.router.input_ids = args[0]


class OracleRouter(TokenChoiceRouter):
    registered_name = "oracle"  # the name in messages (reached by dotted path, not the registry)
    allowed_aux = ("none",)

    def __init__(self, cfg, d_model, num_recursions):
        super().__init__(cfg, d_model, num_recursions)
        params = self.read_params("depth")
        depth = {**DEFAULT_DEPTH, **dict(params.get("depth") or {})}
        bad = set(depth) - set(TOKEN_CLASSES)
        if bad:
            raise ConfigError(
                f"model.router.params.depth has unknown classes {sorted(bad)}: "
                f"allowed {', '.join(TOKEN_CLASSES)}"
            )
        for c, d in depth.items():
            if not isinstance(d, int) or d < 1:
                raise ConfigError(f"model.router.params.depth.{c}={d!r} must be an integer >= 1")
        table, share = next_token_class_table()
        # 0-based last recursion; depths beyond N_r are capped (every recursion)
        by_class = torch.tensor([min(depth[c], num_recursions) - 1 for c in TOKEN_CLASSES])
        # depth choice per token id (non-persistent: derived from the config, not learned)
        self.register_buffer("choice_of_id", by_class[torch.tensor(table)], persistent=False)
        # share of tokens reaching each recursion, in plain Python (also for a meta-device model)
        last = [min(depth[TOKEN_CLASSES[c]], num_recursions) - 1 for c in table]
        pairs = list(zip(share, last, strict=True))
        self.reach = [sum(w for w, d in pairs if d >= r) for r in range(num_recursions)]
        self.input_ids: Tensor | None = None

    def bind(self, model: nn.Module) -> None:
        model.embed_tokens.register_forward_hook(_CaptureIds(self))

    def capacities(self) -> list[float]:
        return self.reach

    def depth_of(self, h1: Tensor) -> Tensor:
        """Depth choice (0-based last recursion) [B, T] of the tokens whose hidden states are h1."""
        ids = self.input_ids
        if ids is None or ids.numel() != h1.shape[0] * h1.shape[1]:
            raise RuntimeError(
                "oracle router: no input ids recorded for this forward (the model's embed_tokens hook "
                "sees every lookup; was the router bound to its model?)"
            )
        ids = ids.reshape(h1.shape[:2]).clamp(0, len(self.choice_of_id) - 1)  # unknown ids: last entry
        return self.choice_of_id[ids].clamp(max=self.n_rec - 1)

    def plan(self, h1: Tensor, aux: dict, stats: dict):
        logits = self.score(h1)
        p = self.probs(logits)
        choice = self.depth_of(h1)
        gate = self.cfg.alpha * torch.gather(p, -1, choice[..., None]).squeeze(-1)
        if self.training and self.cfg.z_coeff > 0:
            aux["router_z"] = self.z_loss(logits)
        with torch.no_grad():
            frac = F.one_hot(choice, self.n_rec).float().flatten(0, -2).mean(0)
            pbar = p.flatten(0, -2).mean(0)
            stats["router/entropy"] = -(pbar * pbar.clamp_min(1e-9).log()).sum()
            stats["router/maxvio"] = (frac.max() - frac.mean()) / frac.mean()
        return choice, gate
