"""Control router: expert-choice selection at the same capacities, with random scores."""

import torch
from torch import Tensor

from .base import register_router
from .expert_choice import ExpertChoiceRouter


@register_router("random")
class RandomRouter(ExpertChoiceRouter):
    """Scores are logit(U(0,1)), so sigmoid gates are uniform; no learning signal (use aux_loss=none)."""

    def score(self, h: Tensor, r: int) -> Tensor:
        u = torch.rand(h.shape[:2], device=h.device, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
        return torch.logit(u).to(h.dtype)
