"""Tests for optlayers.solvers.projections."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.func import jacfwd, jacrev, vmap

from optlayers.solvers.projections import (
    project_box,
    project_halfspace,
    project_l1_ball,
    project_l2_ball,
    project_linf_ball,
    project_nonnegative,
    project_simplex,
    project_sparse_simplex,
)

F64 = torch.float64
TOL = 1e-9
PROPS = settings(max_examples=40, deadline=None)

# Arrays of shape (batch, n) with moderate float64 entries; include repeated values (ties).
_elements = st.one_of(
    st.floats(-10, 10, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 0.5]),
)
batches = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 3), st.integers(1, 7)),
    elements=_elements,
)
radii = st.floats(0.0, 5.0)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=F64)


def _gen(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Simplex
# --------------------------------------------------------------------------------------------


@PROPS
@given(batches, st.floats(0.0, 5.0))
def test_simplex_properties(a: np.ndarray, s: float) -> None:
    x = _t(a)
    p = project_simplex(x, s)
    assert p.shape == x.shape and p.dtype == x.dtype
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.full(x.shape[:-1], s, dtype=F64))
    torch.testing.assert_close(project_simplex(p, s), p, atol=1e-10, rtol=0)
    # Variational inequality (x - p)^T (y - p) <= 0 for all y in the set; the left-hand
    # side is linear in y, so checking the vertices y = s e_i suffices.
    r = x - p
    lhs = s * r.max(-1).values - (r * p).sum(-1)
    assert (lhs <= TOL * (1 + x.abs().max())).all()


@pytest.mark.parametrize("seed", range(3))
def test_simplex_matches_cvxpy(seed: int) -> None:
    cp = pytest.importorskip("cvxpy")
    x = _gen(6, seed=seed) * 2
    s = 1.5
    z = cp.Variable(6)
    cp.Problem(cp.Minimize(cp.sum_squares(z - x.numpy())), [z >= 0, cp.sum(z) == s]).solve()
    torch.testing.assert_close(project_simplex(x, s), _t(z.value), atol=1e-5, rtol=0)


def test_simplex_jacrev_closed_form() -> None:
    x = _gen(7, seed=1)
    p = project_simplex(x)
    support = p > 0
    k = int(support.sum())
    assert 1 < k < 7
    m = support.to(F64)
    expected = (torch.diag(m) - torch.outer(m, m) / k) * torch.outer(m, m)
    torch.testing.assert_close(jacrev(project_simplex)(x), expected)
    torch.testing.assert_close(jacfwd(project_simplex)(x), expected)
    # Derivative with respect to the mass s: 1/|S| on the support.
    ds = jacrev(project_simplex, argnums=1)(x, torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(ds, m / k)


def test_simplex_ties_zeros_single() -> None:
    torch.testing.assert_close(project_simplex(torch.ones(3, dtype=F64)), torch.full((3,), 1 / 3, dtype=F64))
    torch.testing.assert_close(project_simplex(torch.zeros(4, dtype=F64), 2.0), torch.full((4,), 0.5, dtype=F64))
    torch.testing.assert_close(project_simplex(torch.tensor([-3.0], dtype=F64), 2.0), torch.tensor([2.0], dtype=F64))
    torch.testing.assert_close(project_simplex(torch.tensor([5.0, 1.0]), 0.0), torch.zeros(2))
    x = torch.tensor([2.0, 2.0, -1.0], dtype=F64, requires_grad=True)
    p = project_simplex(x)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.5, 0.0], dtype=F64))
    (g,) = torch.autograd.grad(p[0], x)
    torch.testing.assert_close(g, torch.tensor([0.5, -0.5, 0.0], dtype=F64))
    assert torch.isfinite(jacrev(project_simplex)(torch.zeros(3, dtype=F64))).all()


def test_simplex_dim_and_batched_mass() -> None:
    x = _gen(2, 5, 3, seed=2)
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 4.0]], dtype=F64)
    p = project_simplex(x, s, dim=1)
    torch.testing.assert_close(p.sum(1), s)
    ref = project_simplex(x.transpose(1, 2), s).transpose(1, 2)
    torch.testing.assert_close(p, ref)
    torch.testing.assert_close(project_simplex(x, 1.0, dim=-2), project_simplex(x, 1.0, dim=1))


def test_simplex_float32_dtype_preserved() -> None:
    x = _gen(3, 4, dtype=torch.float32)
    p = project_simplex(x, torch.tensor(1.0, dtype=F64))
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(3))


# --------------------------------------------------------------------------------------------
# Sparse simplex
# --------------------------------------------------------------------------------------------


def _brute_sparse_simplex(x: torch.Tensor, k: int, s: float) -> float:
    n = x.shape[-1]
    best = float("inf")
    for support in itertools.combinations(range(n), min(k, n)):
        idx = torch.tensor(support)
        p = torch.zeros_like(x)
        p[idx] = project_simplex(x[idx], s)
        best = min(best, float(((p - x) ** 2).sum()))
    return best


@PROPS
@given(
    hnp.arrays(np.float64, st.integers(1, 6), elements=_elements),
    st.integers(1, 6),
    st.floats(0.0, 3.0),
)
def test_sparse_simplex_brute_force(a: np.ndarray, k: int, s: float) -> None:
    x = _t(a)
    p = project_sparse_simplex(x, k, s)
    assert (p >= 0).all()
    assert int((p != 0).sum()) <= k
    torch.testing.assert_close(p.sum(), torch.tensor(s, dtype=F64))
    obj = float(((p - x) ** 2).sum())
    assert obj <= _brute_sparse_simplex(x, k, s) + 1e-9 * (1 + float((x**2).sum()))


def test_sparse_simplex_matches_simplex_when_k_large_and_grad() -> None:
    x = _gen(3, 5, seed=3)
    torch.testing.assert_close(project_sparse_simplex(x, 5), project_simplex(x))
    torch.testing.assert_close(project_sparse_simplex(x, 9), project_simplex(x))
    xg = x.clone().requires_grad_(True)
    s = torch.tensor([1.0, 2.0, 0.5], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: project_sparse_simplex(x, 2, s), (xg, s))
    # dim handling
    torch.testing.assert_close(project_sparse_simplex(x.T, 2, dim=0), project_sparse_simplex(x, 2).T)


# --------------------------------------------------------------------------------------------
# Norm balls
# --------------------------------------------------------------------------------------------


@PROPS
@given(batches, radii)
def test_l1_ball_properties(a: np.ndarray, r: float) -> None:
    x = _t(a)
    p = project_l1_ball(x, r)
    scale = 1 + x.abs().max()
    assert (p.abs().sum(-1) <= r + TOL * scale).all()
    torch.testing.assert_close(project_l1_ball(p, r), p, atol=1e-10, rtol=0)
    res = x - p
    lhs = r * res.abs().max(-1).values - (res * p).sum(-1)
    assert (lhs <= TOL * scale**2).all()


@pytest.mark.parametrize("seed", range(3))
def test_l1_ball_matches_cvxpy(seed: int) -> None:
    cp = pytest.importorskip("cvxpy")
    x = _gen(6, seed=seed) * 2
    r = 1.3
    z = cp.Variable(6)
    cp.Problem(cp.Minimize(cp.sum_squares(z - x.numpy())), [cp.norm1(z) <= r]).solve()
    torch.testing.assert_close(project_l1_ball(x, r), _t(z.value), atol=1e-5, rtol=0)


@PROPS
@given(batches, radii)
def test_l2_and_linf_ball_properties(a: np.ndarray, r: float) -> None:
    x = _t(a)
    scale = 1 + x.abs().max()
    p2 = project_l2_ball(x, r)
    assert (torch.linalg.vector_norm(p2, dim=-1) <= r + TOL * scale).all()
    torch.testing.assert_close(project_l2_ball(p2, r), p2, atol=1e-10, rtol=0)
    res = x - p2
    lhs = r * torch.linalg.vector_norm(res, dim=-1) - (res * p2).sum(-1)
    assert (lhs <= TOL * scale**2).all()

    pi = project_linf_ball(x, r)
    assert (pi.abs() <= r).all()
    torch.testing.assert_close(project_linf_ball(pi, r), pi)
    res = x - pi
    lhs = r * res.abs().sum(-1) - (res * pi).sum(-1)
    assert (lhs <= TOL * scale**2).all()


def test_balls_inside_identity_zero_and_single() -> None:
    x = torch.tensor([0.1, -0.2], dtype=F64)
    for f in (project_l1_ball, project_l2_ball, project_linf_ball):
        torch.testing.assert_close(f(x, 1.0), x)
        z = torch.zeros(3, dtype=F64)
        torch.testing.assert_close(f(z, 0.0), z)
        assert torch.isfinite(jacrev(f)(z, 0.0)).all()
        assert torch.isfinite(jacfwd(f)(z, 0.0)).all()
        torch.testing.assert_close(f(torch.tensor([-3.0], dtype=F64), 2.0), torch.tensor([-2.0], dtype=F64))
    torch.testing.assert_close(project_l2_ball(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))


def test_balls_batched_radius_and_dim() -> None:
    x = _gen(3, 4, seed=4) * 3
    r = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    for f in (project_l1_ball, project_l2_ball, project_linf_ball):
        loop = torch.stack([f(x[i], float(r[i])) for i in range(3)])
        torch.testing.assert_close(f(x, r), loop)
        torch.testing.assert_close(f(x.T, r, dim=0), loop.T)


# --------------------------------------------------------------------------------------------
# Box, orthant, halfspace
# --------------------------------------------------------------------------------------------


@PROPS
@given(batches, st.floats(-3, 0), st.floats(0, 3))
def test_box_and_nonnegative_properties(a: np.ndarray, lo: float, hi: float) -> None:
    x = _t(a)
    p = project_box(x, lo, hi)
    assert ((p >= lo) & (p <= hi)).all()
    torch.testing.assert_close(project_box(p, lo, hi), p)
    torch.testing.assert_close(p, x.clamp(lo, hi))
    n = project_nonnegative(x)
    assert (n >= 0).all()
    torch.testing.assert_close(project_nonnegative(n), n)
    assert (((x - n) * n).abs() == 0).all()  # complementarity


def test_box_tensor_bounds_broadcast_and_none() -> None:
    x = _gen(2, 3, seed=5) * 3
    lo = torch.tensor([-1.0, 0.0, -2.0], dtype=F64)
    hi = torch.tensor([[1.0], [0.5]], dtype=F64)
    ref = torch.minimum(torch.maximum(x, lo), hi)
    torch.testing.assert_close(project_box(x, lo, hi), ref)
    torch.testing.assert_close(project_box(x, lo, 0.5), x.clamp(min=lo).clamp(max=0.5))
    torch.testing.assert_close(project_box(x, None, hi), torch.minimum(x, hi))
    torch.testing.assert_close(project_box(x, 0.0, None), x.clamp(min=0.0))
    torch.testing.assert_close(project_box(x, None, None), x)


@PROPS
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 5)), elements=_elements),
    st.floats(-3, 3),
)
def test_halfspace_properties(a_np: np.ndarray, b: float) -> None:
    x = _t(a_np)
    a = torch.arange(1, x.shape[-1] + 1, dtype=F64)
    p = project_halfspace(x, a, b)
    scale = 1 + x.abs().max()
    assert ((p * a).sum(-1) <= b + 1e-9 * scale * a.sum()).all()
    torch.testing.assert_close(project_halfspace(p, a, b), p, atol=1e-9, rtol=0)
    # x - p = mu a with mu >= 0 and complementarity mu (a^T p - b) = 0.
    mu = ((x - p) * a).sum(-1) / (a * a).sum()
    torch.testing.assert_close(x - p, mu[:, None] * a)
    assert (mu >= -1e-12).all()
    assert (mu * ((p * a).sum(-1) - b)).abs().max() <= 1e-8 * scale**2


@pytest.mark.parametrize("seed", range(2))
def test_halfspace_matches_cvxpy(seed: int) -> None:
    cp = pytest.importorskip("cvxpy")
    x, a = _gen(5, seed=seed) + 1, _gen(5, seed=seed + 10)
    b = -0.3
    z = cp.Variable(5)
    cp.Problem(cp.Minimize(cp.sum_squares(z - x.numpy())), [a.numpy() @ z <= b]).solve()
    torch.testing.assert_close(project_halfspace(x, a, b), _t(z.value), atol=1e-5, rtol=0)


def test_halfspace_broadcast_and_degenerate() -> None:
    x = _gen(4, 3, seed=6)
    a = _gen(4, 3, seed=7)
    b = torch.linspace(-1, 1, 4, dtype=F64)
    loop = torch.stack([project_halfspace(x[i], a[i], float(b[i])) for i in range(4)])
    torch.testing.assert_close(project_halfspace(x, a, b), loop)
    # x unbatched, a batched: output has the broadcast shape
    assert project_halfspace(x[0], a, 0.0).shape == (4, 3)
    # a = 0 with b >= 0 is the whole space
    torch.testing.assert_close(project_halfspace(x, torch.zeros(3, dtype=F64), 1.0), x)
    with pytest.raises(ValueError, match="empty"):
        project_halfspace(x, torch.zeros(3, dtype=F64), -1.0)


# --------------------------------------------------------------------------------------------
# Autograd, torch.func
# --------------------------------------------------------------------------------------------


def _ops() -> dict[str, tuple]:
    """name -> (function of differentiable args, args) at points away from kinks."""
    x = _gen(2, 5, seed=11)
    a = _gen(5, seed=12)
    return {
        "simplex": (project_simplex, (x, torch.tensor([1.0, 2.0], dtype=F64))),
        "sparse_simplex": (lambda x, s: project_sparse_simplex(x, 3, s), (x, torch.tensor(1.5, dtype=F64))),
        "l1": (project_l1_ball, (x, torch.tensor([0.7, 1.1], dtype=F64))),
        "l2": (project_l2_ball, (x, torch.tensor([0.7, 1.1], dtype=F64))),
        "linf": (project_linf_ball, (x, torch.tensor([0.7, 1.1], dtype=F64))),
        "box": (project_box, (x, torch.full((5,), -0.5, dtype=F64), torch.full((2, 1), 0.6, dtype=F64))),
        "nonnegative": (project_nonnegative, (x,)),
        "halfspace": (project_halfspace, (x, a, torch.tensor([-0.2, 0.1], dtype=F64))),
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_gradcheck(name: str) -> None:
    f, args = _ops()[name]
    args = tuple(t.clone().requires_grad_(True) for t in args)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("name", list(_ops()))
def test_vmap_and_jacobians_match_loop(name: str) -> None:
    f, args = _ops()[name]
    x, rest = args[0], args[1:]

    # Per-row arguments: parameters of batch shape (2,) or (2, 1) are sliced with x.
    def row(i: int) -> tuple:
        out = []
        for t in rest:
            if t.ndim >= 1 and t.shape[0] == 2:
                out.append(t[i])
            else:
                out.append(t)
        return tuple(out)

    in_dims = (0, *[0 if (t.ndim >= 1 and t.shape[0] == 2) else None for t in rest])
    loop = torch.stack([f(x[i], *row(i)) for i in range(2)])
    torch.testing.assert_close(vmap(f, in_dims=in_dims)(x, *rest), loop)
    jr = vmap(jacrev(f), in_dims=in_dims)(x, *rest)
    jf = vmap(jacfwd(f), in_dims=in_dims)(x, *rest)
    jl = torch.stack([torch.autograd.functional.jacobian(lambda z, i=i: f(z, *row(i)), x[i]) for i in range(2)])
    torch.testing.assert_close(jr, jl)
    torch.testing.assert_close(jf, jl)


def test_vmap_over_tensor_parameter_skips_value_checks() -> None:
    x = _gen(3, 4, seed=13)
    r = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    out = vmap(project_l1_ball)(x, r)
    torch.testing.assert_close(out, project_l1_ball(x, r))
    out = vmap(project_simplex, in_dims=(None, 0))(x[0], r)
    torch.testing.assert_close(out.sum(-1), r)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = _gen(3, 6, seed=14)
    for f in (project_simplex, project_l1_ball, project_l2_ball, project_linf_ball):
        torch.testing.assert_close(f(x.cuda()).cpu(), f(x))
    torch.testing.assert_close(project_sparse_simplex(x.cuda(), 2).cpu(), project_sparse_simplex(x, 2))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_validation_errors() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="x must have a floating-point dtype"):
        project_simplex(torch.arange(4))
    with pytest.raises(ValueError, match="x must have a floating-point dtype"):
        project_nonnegative(torch.arange(4))
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        project_l2_ball([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        project_simplex(x, dim=2)
    with pytest.raises(ValueError, match="dim=-3 is out of range"):
        project_l1_ball(x, 1.0, dim=-3)
    with pytest.raises(ValueError, match="0-d"):
        project_simplex(torch.tensor(1.0))
    with pytest.raises(ValueError, match="s must be >= 0"):
        project_simplex(x, -1.0)
    with pytest.raises(ValueError, match="s must be >= 0"):
        project_simplex(x, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="s of shape"):
        project_simplex(x, torch.ones(4))
    for f in (project_l1_ball, project_l2_ball, project_linf_ball):
        with pytest.raises(ValueError, match="radius must be >= 0"):
            f(x, -0.5)
        with pytest.raises(ValueError, match="radius must be >= 0"):
            f(x, torch.tensor(-0.5))
        with pytest.raises(ValueError, match="radius of shape"):
            f(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        project_sparse_simplex(x, 0)
    with pytest.raises(ValueError, match="k must be an int"):
        project_sparse_simplex(x, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lower must be <= upper"):
        project_box(x, 1.0, 0.0)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        project_box(x, torch.tensor([0.0, 2.0, 0.0, 0.0]), torch.ones(4))
    with pytest.raises(ValueError, match="upper must be >= lower"):
        project_box(x, 0.0, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="lower of shape"):
        project_box(x, torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match="a must have shape"):
        project_halfspace(x, torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="a must have a floating-point dtype"):
        project_halfspace(x, torch.ones(4, dtype=torch.int64), 0.0)
    with pytest.raises(ValueError, match="b of shape"):
        project_halfspace(x, torch.ones(4), torch.zeros(5))
