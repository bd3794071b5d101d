"""DEQ z = tanh(Wz + Ux + b): implicit gradients against the exact dense IFT."""

import pytest
import torch
from torch.autograd import gradcheck

from optlayers import ConvergenceError, OneStepAdjoint, Picard
from optlayers.layers.deq import DEQ, PhantomGradient

DT = torch.float64


class Cell(torch.nn.Module):
    def __init__(self, n, scale):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, n, generator=g, dtype=DT)
        self.W = torch.nn.Parameter(scale * W / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(n, n, generator=g, dtype=DT))
        self.b = torch.nn.Parameter(torch.randn(n, generator=g, dtype=DT))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def dense_ift_grad(cell, x, z):
    """Exact gradient of Σ z* w.r.t. W by the dense IFT, per sample."""
    grads = torch.zeros_like(cell.W)
    for i in range(x.shape[0]):
        pre = cell.W @ z[i] + cell.U @ x[i] + cell.b
        D = torch.diag(1 - torch.tanh(pre) ** 2)
        J = D @ cell.W
        u = torch.linalg.solve((torch.eye(len(z[i]), dtype=DT) - J).T, torch.ones(len(z[i]), dtype=DT))
        grads += torch.outer(D @ u, z[i])
    return grads


def test_deq_implicit_gradient_matches_dense_ift():
    cell = Cell(6, 0.8)
    x = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    deq = DEQ(cell)
    z = deq(x)
    torch.testing.assert_close(z, cell(z, x), rtol=0, atol=1e-9)
    (gW,) = torch.autograd.grad(z.sum(), cell.W)
    torch.testing.assert_close(gW, dense_ift_grad(cell, x, z.detach()), rtol=1e-9, atol=1e-12)
    res = deq.solve(x)
    assert res.converged.shape == (4,) and bool(res.converged.all())


def test_deq_gradcheck_wrt_input():
    cell = Cell(3, 0.5)
    deq = DEQ(cell)
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    assert gradcheck(lambda xx: deq(xx), (x,))


def test_expansive_deq_is_reported():
    cell = Cell(6, 8.0)
    x = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(2)) * 3
    with pytest.raises(ConvergenceError):
        DEQ(cell, solver=Picard(max_iter=50))(x)
    res = DEQ(cell, solver=Picard(max_iter=50), throw=False).solve(x)
    assert not bool(res.converged.all())


def test_cheap_gradients_and_jacobian_penalty():
    cell = Cell(5, 0.5)
    x = torch.randn(3, 5, dtype=DT)
    for adjoint in (OneStepAdjoint(), PhantomGradient(steps=3, damping=0.8)):
        z = DEQ(cell, adjoint=adjoint)(x)
        (g,) = torch.autograd.grad(z.sum(), cell.W)
        assert torch.isfinite(g).all()
    res = DEQ(cell, jacobian_samples=4).solve(x)
    pen = res.aux.jacobian_penalty
    assert pen.shape == (3,) and (pen > 0).all()
    (gp,) = torch.autograd.grad(pen.sum(), cell.W)
    assert torch.isfinite(gp).all()
