"""Adam for the few parameter tensors of a registration stage.

The update is ``torch.optim.Adam``'s (Kingma & Ba, with bias correction; defaults
``betas=(0.9, 0.999)``, ``eps=1e-8``, no weight decay), step for step. The engine keeps its own
because building any ``torch.optim`` optimiser imports ``torch._dynamo`` the first time (about
1 s on a 2-core CPU), which is as long as a whole registration of small images (the
hippocampus crops) and was charged to every ``medreg register`` call.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor


class Adam:
    """``torch.optim.Adam`` for plain use: ``zero_grad()``, ``step(closure)``, ``lr``.

    Args:
        params: the tensors to optimise (leaf tensors with ``requires_grad``).
        lr: step size.
        betas, eps: as ``torch.optim.Adam``.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got an empty parameter list")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update from the current gradients (``closure`` recomputes them first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        b1, b2 = self.betas
        self.steps += 1
        bias1 = 1.0 - b1 ** self.steps
        bias2_sqrt = math.sqrt(1.0 - b2 ** self.steps)
        with torch.no_grad():
            for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
                if p.grad is None:
                    continue
                g = p.grad
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / bias1)
        return loss


__all__ = ["Adam"]
