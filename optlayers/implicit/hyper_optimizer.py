"""A small loop helper for bilevel training: inner steps on ``w``, outer steps on ``λ``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .adjoints import ImplicitAdjoint, UnrollAdjoint
from .hypergradient import PenaltyMethod, hypergradient

__all__ = ["HyperOptimizer"]


class HyperOptimizer:
    """Alternate inner optimization of ``w`` and hypergradient steps on ``λ``.

    Each :meth:`step` runs ``inner_steps`` steps of ``inner_optimizer`` on
    ``inner_loss(params, hparams)`` — warm-started from the current ``params`` — then computes the
    hypergradient of ``outer_loss`` at the reached ``params`` with :func:`hypergradient` and takes
    one ``outer_optimizer`` step on ``hparams``.

    Args:
        outer_loss: ``L_out(params, hparams)``.
        inner_loss: ``L_in(params, hparams)``.
        params: The inner variables: an ``nn.Module`` or a pytree of leaf tensors that require grad
            (the ones ``inner_optimizer`` updates).
        hparams: A pytree of leaf tensors that require grad (the ones ``outer_optimizer`` updates).
        inner_optimizer: Any ``torch.optim`` optimizer over ``params``.
        outer_optimizer: Any ``torch.optim`` optimizer over ``hparams``.
        inner_steps: Inner steps per outer step.
        method: Hypergradient method (default ``ImplicitAdjoint(CG())``).

    Example:
        >>> import torch
        >>> X, y = torch.randn(40, 3), torch.randn(40)
        >>> w = torch.zeros(3, requires_grad=True)
        >>> log_lam = torch.zeros(3, requires_grad=True)
        >>> inner = lambda w, h: ((X @ w - y) ** 2).mean() + (h.exp() * w ** 2).sum() / 40
        >>> outer = lambda w, h: ((X @ w - 1) ** 2).mean()
        >>> opt = HyperOptimizer(outer, inner, w, log_lam, torch.optim.LBFGS([w]),
        ...                      torch.optim.Adam([log_lam], lr=0.1), inner_steps=5)
        >>> sorted(opt.step())
        ['adjoint_residual', 'inner_residual', 'outer_loss']
    """

    def __init__(self, outer_loss: Callable[[Any, Any], torch.Tensor],
                 inner_loss: Callable[[Any, Any], torch.Tensor], params: Any, hparams: Any,
                 inner_optimizer: torch.optim.Optimizer, outer_optimizer: torch.optim.Optimizer, *,
                 inner_steps: int = 10, method: ImplicitAdjoint | PenaltyMethod | UnrollAdjoint | None = None) -> None:
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        self.outer_loss, self.inner_loss = outer_loss, inner_loss
        self.module = params if isinstance(params, nn.Module) else None
        self.params = params
        self.hparams = hparams
        self.inner_optimizer, self.outer_optimizer = inner_optimizer, outer_optimizer
        self.inner_steps = inner_steps
        self.method = method

    def _params_tree(self) -> Any:
        if self.module is not None:
            return dict(self.module.named_parameters())
        return self.params

    def step(self) -> dict[str, float]:
        """One outer step; returns the inner residual ‖∇_w L_in‖, the outer loss and the adjoint residual."""
        params = self._params_tree()
        hp_detached = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, self.hparams)

        def closure() -> torch.Tensor:
            self.inner_optimizer.zero_grad()
            loss = self.inner_loss(params, hp_detached)
            loss.backward()
            return loss

        for _ in range(self.inner_steps):
            self.inner_optimizer.step(closure)  # type: ignore[arg-type]
        res = hypergradient(self.outer_loss, self.inner_loss, params, self.hparams, method=self.method)
        leaves = [t for t in pytree.tree_leaves(self.hparams) if isinstance(t, torch.Tensor)]
        grads = pytree.tree_leaves(res.solution)
        for t, g in zip(leaves, grads):
            t.grad = g.detach().to(t.dtype)
        self.outer_optimizer.step()
        return {"inner_residual": float(res.aux.inner_grad_norm), "outer_loss": float(res.aux.outer_value),
                "adjoint_residual": float(res.residual)}
