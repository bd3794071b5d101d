r"""Prospect: a variance-reduced optimizer for full-data spectral risk (Mehta et al., ICLR 2024).

Minimises, over the parameters :math:`w`,

.. math:: F(w) = \max_{q\in\mathcal P(\sigma)} \sum_{i=1}^n q_i\,\ell_i(w) - \lambda D(q)
          + \frac\mu2\lVert w\rVert^2

(a :class:`~optlayers.solvers.dro.Spectral` spec with a penalty :math:`\lambda > 0`) over a
finite training set, with a single step size and linear convergence for smooth, strongly convex
problems. It keeps a table of per-example losses and gradients *keyed by dataset index*, the
current smoothed weights :math:`q` (recomputed exactly by sort + PAV after each step) and the
weights :math:`\rho` at which the stored gradients were taken. One step with sampled index
:math:`i` and fresh gradient :math:`g_i = \nabla\ell_i(w)`:

.. math:: v = n q_i g_i - n \rho_i g^{\text{old}}_i + \textstyle\sum_j \rho_j g^{\text{old}}_j,\qquad
          w \leftarrow \frac{w - \eta v}{1 + \eta\mu},

then :math:`\ell_i` is updated in the loss table, :math:`q` recomputed, and the running sum,
:math:`\rho_i` and :math:`g^{\text{old}}_i` updated. The tables live in the optimizer state
(``state_dict``).

Usage::

    opt = Prospect(model.parameters(), lr=0.01, spec=Spectral(esrm(1.0), lam=0.5), n_examples=n,
                   weight_decay=1e-3)
    opt.init_tables(lambda idx: per_example_loss(model, X[idx], y[idx]))
    for _ in range(steps):
        i = opt.sample()
        def closure():
            opt.zero_grad()
            loss = per_example_loss(model, X[i:i + 1], y[i:i + 1]).sum()
            loss.backward()
            return loss
        opt.step(i, closure)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ...solvers.dro import Spectral, robust_weights

__all__ = ["Prospect"]


class Prospect(torch.optim.Optimizer):
    r"""Prospect optimizer for full-data spectral risk with a per-example loss table.

    Minimises :math:`F(w) = \max_{q\in\mathcal P(\sigma)} \sum_i q_i\ell_i(w) - \lambda D(q)
    + \frac\mu2\lVert w\rVert^2` with the variance-reduced step of the module docstring.

    Args:
        params: Parameters (one group).
        lr: The single step size :math:`\eta`.
        spec: A :class:`~optlayers.solvers.dro.Spectral` spec with ``lam > 0`` (the smoothing
            that makes the objective differentiable and the method linearly convergent).
        n_examples: Training-set size :math:`n` (indices ``0 .. n-1``).
        weight_decay: :math:`\mu \ge 0` of the :math:`\frac\mu2\lVert w\rVert^2` term (applied
            by its proximal step).
        generator: Optional ``torch.Generator`` for :meth:`sample`.

    Example:
        Least squares on eight noiseless examples: Prospect drives the smoothed ESRM risk of the
        per-example losses to zero and recovers the true weights:

        >>> import torch
        >>> from optlayers.layers.dro import Prospect
        >>> from optlayers.solvers.dro import Spectral, esrm, robust_weights
        >>> X = torch.randn(8, 2, dtype=torch.float64)
        >>> y = X @ torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> def per_example_loss(idx):
        ...     return 0.5 * (X[idx] @ w - y[idx]) ** 2
        >>> spec = Spectral(esrm(1.0), lam=0.5)
        >>> opt = Prospect([w], lr=0.05, spec=spec, n_examples=8, generator=torch.Generator().manual_seed(0))
        >>> opt.init_tables(per_example_loss)
        >>> for _ in range(200):
        ...     i = opt.sample()
        ...     def closure():
        ...         opt.zero_grad()
        ...         loss = per_example_loss(torch.tensor([i])).sum()
        ...         loss.backward()
        ...         return loss
        ...     _ = opt.step(i, closure)
        >>> risk = robust_weights(per_example_loss(torch.arange(8)).detach(), spec).aux.value
        >>> bool(risk < 1e-8), torch.allclose(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
        (True, True)
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *, lr: float, spec: Spectral,
                 n_examples: int, weight_decay: float = 0.0, generator: torch.Generator | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not isinstance(spec, Spectral):
            raise TypeError("Prospect needs a Spectral spec (e.g. Spectral(esrm(1.0), lam=0.5))")
        if not spec.lam > 0:
            raise ValueError("Prospect needs a smoothed spectral risk: Spectral(..., lam > 0)")
        if int(n_examples) < 1:
            raise ValueError(f"n_examples must be >= 1, got {n_examples}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": float(lr), "weight_decay": float(weight_decay)})
        if len(self.param_groups) != 1:
            raise ValueError("Prospect supports a single parameter group")
        self.spec = spec
        self.n = int(n_examples)
        self.generator = generator

    def _params(self) -> list[Tensor]:
        return [p for p in self.param_groups[0]["params"]]

    def _flat_grad(self) -> Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self._params()])

    def _weights(self, losses: Tensor) -> Tensor:
        return robust_weights(losses, self.spec).solution

    @property
    def tables(self) -> dict[str, Tensor]:
        """``losses`` (n,), ``grads`` (n, d), ``q`` (n,), ``rho`` (n,), ``running`` (d,)."""
        if "prospect" not in self.state:
            raise RuntimeError("call init_tables(loss_fn) before stepping")
        return self.state["prospect"]  # type: ignore[index]

    def init_tables(self, loss_fn: Callable[[Tensor], Tensor], *, batch_size: int = 1) -> None:
        """Fill the loss and gradient tables at the current parameters.

        Args:
            loss_fn: ``loss_fn(indices) -> per-example losses`` (shape ``(len(indices),)``).
            batch_size: Indices per call (per-example gradients are taken one at a time).
        """
        params = self._params()
        losses, grads = [], []
        for start in range(0, self.n, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.n))
            with torch.enable_grad():
                ls = loss_fn(idx)
                if ls.shape != (len(idx),):
                    raise ValueError("loss_fn must return one loss per index")
                for j in range(len(idx)):
                    g = torch.autograd.grad(ls[j], params, retain_graph=j + 1 < len(idx), allow_unused=True)
                    grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                            for gi, p in zip(g, params, strict=True)]))
            losses.append(ls.detach())
        L = torch.cat(losses)
        G = torch.stack(grads)
        q = self._weights(L)
        tables = {"losses": L, "grads": G, "q": q, "rho": q.clone(), "running": G.T.to(q.dtype) @ q}
        self.state["prospect"] = tables  # type: ignore[index]

    def sample(self) -> int:
        """A uniformly random example index."""
        return int(torch.randint(self.n, (1,), generator=self.generator))

    @torch.no_grad()
    def step(self, index: int, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One Prospect step on example ``index``.

        Args:
            index: Dataset index of the example.
            closure: Zeroes the gradients, computes the loss of example ``index`` at the current
                parameters, calls ``backward`` and returns the loss.

        Returns:
            The example's loss before the step.
        """
        T = self.tables
        i = int(index)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for n_examples={self.n}")
        with torch.enable_grad():
            loss = closure()
        g = self._flat_grad().to(T["grads"].dtype)
        group = self.param_groups[0]
        lr, mu = group["lr"], group["weight_decay"]
        n = self.n
        q_i = T["q"][i].clone()
        rho_i = T["rho"][i].clone()
        g_old = T["grads"][i].clone()
        v = n * q_i * g - n * rho_i * g_old + T["running"]
        offset = 0
        for p in self._params():
            k = p.numel()
            p.sub_(lr * v[offset:offset + k].reshape(p.shape).to(p.dtype)).div_(1.0 + lr * mu)
            offset += k
        T["losses"][i] = loss.detach().reshape(())
        T["q"] = self._weights(T["losses"])
        T["rho"][i] = q_i
        T["grads"][i] = g
        T["running"] = T["running"] + q_i * g - rho_i * g_old
        return loss.detach()

    def objective_weights(self) -> Tensor:
        """The current smoothed worst-case weights :math:`q` over the training set."""
        return self.tables["q"]
