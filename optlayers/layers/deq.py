"""Deep-equilibrium layers: ``z* = f(z*, x)`` with implicit (or phantom/one-step) gradients."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .._result import Result, register_aux
from ..implicit import GMRES, Anderson, ImplicitAdjoint, OneStepAdjoint, Picard, UnrollAdjoint, fixed_point
from ..implicit.adjoints import resolve_adjoint

__all__ = ["DEQ", "DEQInfo", "PhantomGradient"]


@dataclasses.dataclass(frozen=True)
class PhantomGradient:
    r"""Phantom gradient (Geng et al., NeurIPS 2021): backpropagate through ``steps`` damped
    iterations ``z ← (1 − τ) z + τ f(z, x)`` started at the (detached) equilibrium.

    With ``J = ∂_z f(z*, x)`` and the iterations kept at ``z*``, the phantom Jacobian is

    .. math:: \frac{∂z_k}{∂x} = τ \sum_{j=0}^{k-1} \big((1 − τ) I + τ J\big)^j\, ∂_x f,

    a truncated Neumann series of the exact ``(I − J)⁻¹ ∂_x f``, reached as ``k → ∞`` when
    ``ρ(J) < 1``. Small ``k`` is cheaper and acts as a regularizer.

    Args:
        steps: Number of differentiated iterations ``k``.
        damping: ``τ`` in (0, 1].

    Example:
        For ``f(z, x) = z/2 + x``, ``z* = 2x`` and the exact gradient is 2; the phantom gradient is
        ``2 (1 − (1 − τ/2)^k)``:

        >>> import torch
        >>> from optlayers.layers import DEQ, PhantomGradient
        >>> class Half(torch.nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> z = DEQ(Half(), adjoint=PhantomGradient(steps=5, damping=0.5))(x)
        >>> torch.autograd.grad(z.sum(), x)[0]  # 2 (1 − 0.75⁵)
        tensor([[1.5254, 1.5254]], dtype=torch.float64)
        >>> z = DEQ(Half(), adjoint=PhantomGradient(steps=5, damping=1.0))(x)
        >>> torch.autograd.grad(z.sum(), x)[0]  # 2 (1 − 0.5⁵)
        tensor([[1.9375, 1.9375]], dtype=torch.float64)
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")


@register_aux
@dataclasses.dataclass(frozen=True)
class DEQInfo:
    """Extras of :meth:`DEQ.solve`.

    Attributes:
        jacobian_penalty: Hutchinson estimate of ``‖∂f/∂z‖_F² / dim(z)`` at ``z*`` per sample
            (differentiable in the parameters of ``f``; add it to the loss to keep the layer
            contractive, Bai et al. 2021), or None when not requested.

    The estimate uses ``‖J‖_F² = E_v ‖vᵀ J‖²`` for ``v ~ N(0, I)``, ``J = ∂_z f(z*, x)``, averaged
    over ``jacobian_samples`` draws of ``v``; it is random unless the seed is fixed.

    Example:
        For ``f(z, x) = z/2 + x``, ``J = I/2`` and the exact value is ``‖J‖_F² / 4 = 0.25``:

        >>> import torch
        >>> from optlayers.layers import DEQ
        >>> class Half(torch.nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> _ = torch.manual_seed(0)
        >>> info = DEQ(Half(), jacobian_samples=16).solve(torch.ones(8, 4, dtype=torch.float64)).aux
        >>> info.jacobian_penalty.shape, abs(info.jacobian_penalty.mean().item() - 0.25) < 0.05
        (torch.Size([8]), True)
    """

    jacobian_penalty: torch.Tensor | None = None


class DEQ(nn.Module):
    """A deep-equilibrium layer ``z* = f(z*, x)``.

    ``f`` is any module called as ``f(z, x)``. The equilibrium is found per sample (the leading
    dimension of ``z`` indexes independent problems) by ``solver``; gradients with respect to
    ``x`` and every parameter of ``f`` use ``adjoint``:

    * ``ImplicitAdjoint(...)`` (default ``ImplicitAdjoint(GMRES())``): exact implicit gradient, solving
      ``(I − ∂_z f)ᵀ u = ḡ`` matrix-free;
    * :class:`OneStepAdjoint`: Jacobian-free backprop (one differentiable step at ``z*``);
    * :class:`PhantomGradient`: ``k`` damped differentiable steps;
    * ``UnrollAdjoint()``: differentiate the solver's iterations (baseline).

    Args:
        f: The module ``f(z, x)``.
        solver: :class:`Anderson` (default) or :class:`Picard`.
        adjoint: Gradient mode.
        throw: Raise :class:`ConvergenceError` when any sample does not converge (e.g. a
            non-contractive ``f``); with ``False`` read ``solve(x).converged``.
        warm_start: Start from the previous call's equilibrium when shapes match.
        jacobian_samples: Hutchinson samples for ``aux.jacobian_penalty`` (0: not computed).

    Example:
        >>> import torch
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 4)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> deq = DEQ(Cell())
        >>> deq(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    def __init__(self, f: nn.Module, *, solver: Anderson | Picard | None = None,
                 adjoint: ImplicitAdjoint | OneStepAdjoint | UnrollAdjoint | PhantomGradient | None = None,
                 throw: bool = True, warm_start: bool = False, jacobian_samples: int = 0) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise ValueError(f"f must be an nn.Module called as f(z, x), got {type(f).__name__}")
        if jacobian_samples < 0:
            raise ValueError(f"jacobian_samples must be >= 0, got {jacobian_samples}")
        self.f = f
        self.solver = solver if solver is not None else Anderson()
        if adjoint is None:  # matrix-free: a dense per-sample Jacobian is wasteful at DEQ widths
            adjoint = ImplicitAdjoint(linear_solver=GMRES())
        self.adjoint = adjoint if isinstance(adjoint, PhantomGradient) else resolve_adjoint(adjoint)
        self.throw = throw
        self.warm_start = warm_start
        self.jacobian_samples = jacobian_samples
        self._last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """The equilibrium ``z*`` (``z0`` defaults to zeros like ``x``)."""
        return self.solve(x, z0).solution

    def _z0(self, x: torch.Tensor, z0: torch.Tensor | None) -> torch.Tensor:
        if z0 is not None:
            if z0.shape[0] != x.shape[0]:
                raise ValueError(f"z0 must have the batch size of x ({x.shape[0]}), got shape {tuple(z0.shape)}")
            return z0
        if self.warm_start and self._last is not None and self._last.shape[0] == x.shape[0]:
            return self._last
        return torch.zeros_like(x)

    def solve(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> Result:
        """Solve for the equilibrium and return the full :class:`Result` (per-sample flags)."""
        if x.dim() < 1:
            raise ValueError(f"x must have a leading batch dimension, got shape {tuple(x.shape)}")
        params: dict[str, torch.Tensor] = dict(self.f.named_parameters())
        buffers = dict(self.f.named_buffers())

        def T(z: torch.Tensor, p: dict[str, torch.Tensor], xx: torch.Tensor) -> torch.Tensor:
            return functional_call(self.f, {**p, **buffers}, (z, xx))

        start = self._z0(x, z0)
        if isinstance(self.adjoint, PhantomGradient):
            res = fixed_point(T, start, {k: v.detach() for k, v in params.items()}, x.detach(),
                              solver=self.solver, adjoint=ImplicitAdjoint(), throw=self.throw, batch_ndim=1)
            z = res.solution.detach()
            tau = self.adjoint.damping
            for _ in range(self.adjoint.steps):
                z = (1 - tau) * z + tau * T(z, params, x)
            res = res.replace(solution=z)
        else:
            res = fixed_point(T, start, params, x, solver=self.solver, adjoint=self.adjoint,
                              throw=self.throw, batch_ndim=1)
        if self.warm_start:
            self._last = res.solution.detach()
        penalty = None
        if self.jacobian_samples:
            penalty = self._jacobian_penalty(T, res.solution.detach(), params, x)
        return res.replace(aux=DEQInfo(penalty))

    def _jacobian_penalty(self, T: Any, z: torch.Tensor, params: dict[str, torch.Tensor],
                          x: torch.Tensor) -> torch.Tensor:
        z = z.requires_grad_()
        fz = T(z, params, x)
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for _ in range(self.jacobian_samples):
            v = torch.randn_like(fz)
            (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True, retain_graph=True)
            total = total + vjp.reshape(z.shape[0], -1).pow(2).sum(-1)
        return total / (self.jacobian_samples * z[0].numel())
