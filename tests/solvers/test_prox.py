"""Tests for optlayers.solvers.prox."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.func import jacfwd, jacrev, vmap

from optlayers.solvers.projections import project_l2_ball, project_linf_ball
from optlayers.solvers.prox import prox_elastic_net, prox_group_lasso, prox_l1, prox_l2

F64 = torch.float64
PROPS = settings(max_examples=40, deadline=None)

_elements = st.one_of(
    st.floats(-10, 10, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 0.5]),
)
batches = hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 7)), elements=_elements)
lams = st.floats(0.0, 3.0)
steps = st.floats(0.05, 2.0)
GROUPS = torch.tensor([2, 0, 2, 5, 0, 5, 5])  # three groups, non-contiguous ids


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=F64)


def _gen(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _group_l2_ball(x: torch.Tensor, radius: float, groups: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for g in groups.unique():
        m = groups == g
        out[..., m] = project_l2_ball(x[..., m], radius)
    return out


# --------------------------------------------------------------------------------------------
# Properties: optimality conditions and Moreau decomposition
# --------------------------------------------------------------------------------------------


@PROPS
@given(batches, lams, steps)
def test_prox_l1_optimality_and_moreau(a: np.ndarray, lam: float, step: float) -> None:
    x = _t(a)
    z = prox_l1(x, lam, step)
    t = lam * step
    # 0 in (z - x)/step + lam * subdifferential(|z|)
    nz = z != 0
    torch.testing.assert_close((x - z)[nz], t * torch.sign(z[nz]))
    assert ((x[~nz]).abs() <= t + 1e-12).all()
    # Moreau: x = prox_{step g}(x) + step * prox_{g*/step}(x/step), g* = indicator of the
    # lam-Linf ball, so the second term is the projection onto the (step lam)-Linf ball.
    torch.testing.assert_close(z + project_linf_ball(x, t), x)


@PROPS
@given(batches, lams, steps)
def test_prox_l2_moreau(a: np.ndarray, lam: float, step: float) -> None:
    x = _t(a)
    z = prox_l2(x, lam, step)
    torch.testing.assert_close(z + project_l2_ball(x, lam * step), x)
    norm = torch.linalg.vector_norm(x, dim=-1)
    zero = norm <= lam * step
    assert (z[zero] == 0).all()


@PROPS
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.just(7)), elements=_elements),
    lams,
    steps,
)
def test_prox_group_lasso_moreau(a: np.ndarray, lam: float, step: float) -> None:
    x = _t(a)
    z = prox_group_lasso(x, lam, GROUPS, step)
    torch.testing.assert_close(z + _group_l2_ball(x, lam * step, GROUPS), x)


@PROPS
@given(batches, lams, st.floats(0.0, 3.0), steps)
def test_prox_elastic_net_optimality(a: np.ndarray, lam: float, gamma: float, step: float) -> None:
    x = _t(a)
    z = prox_elastic_net(x, lam, gamma, step)
    # 0 in (z - x)/step + gamma z + lam * subdifferential(|z|)
    r = (x - z) / step - gamma * z
    nz = z != 0
    torch.testing.assert_close(r[nz], lam * torch.sign(z[nz]))
    assert (r[~nz].abs() <= lam + 1e-12).all()


# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------


def test_prox_matches_cvxpy() -> None:
    cp = pytest.importorskip("cvxpy")
    x = _gen(7, seed=1) * 2
    xn = x.numpy()
    lam, gamma, step = 0.8, 0.5, 0.7
    z = cp.Variable(7)

    def solve(penalty: object) -> torch.Tensor:
        cp.Problem(cp.Minimize(cp.sum_squares(z - xn) / (2 * step) + penalty)).solve()
        return torch.as_tensor(z.value, dtype=F64)

    torch.testing.assert_close(
        prox_elastic_net(x, lam, gamma, step),
        solve(lam * cp.norm1(z) + gamma / 2 * cp.sum_squares(z)),
        atol=1e-5,
        rtol=0,
    )
    groups = [np.flatnonzero(GROUPS.numpy() == g) for g in (0, 2, 5)]
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    pen = sum(float(w) * cp.norm2(z[idx]) for w, idx in zip(weights, groups, strict=True))
    torch.testing.assert_close(
        prox_group_lasso(x, lam, GROUPS, step, weights=weights),
        solve(lam * pen),
        atol=1e-5,
        rtol=0,
    )


def test_prox_l1_in_proximal_gradient_loop_solves_lasso() -> None:
    """The documented adapter ``prox(z, step, *params)`` drives ISTA to the lasso solution."""
    cp = pytest.importorskip("cvxpy")
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 6, generator=g, dtype=F64)
    y = torch.randn(12, generator=g, dtype=F64)
    lam = 0.5

    def prox(z: torch.Tensor, step: float, lam: float) -> torch.Tensor:  # as in the docs' lambda
        return prox_l1(z, lam, step)

    step = 1.0 / float(torch.linalg.matrix_norm(A, 2) ** 2)
    z = torch.zeros(6, dtype=F64)
    for _ in range(3000):
        z = prox(z - step * A.T @ (A @ z - y), step, lam)
    w = cp.Variable(6)
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A.numpy() @ w - y.numpy()) + lam * cp.norm1(w))).solve()
    torch.testing.assert_close(z, torch.as_tensor(w.value, dtype=F64), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Closed forms, edge cases, conventions
# --------------------------------------------------------------------------------------------


def test_closed_forms_and_edge_cases() -> None:
    x = torch.tensor([3.0, -0.5, -2.0, 0.0], dtype=F64)
    torch.testing.assert_close(prox_l1(x, 1.0), torch.tensor([2.0, 0.0, -1.0, 0.0], dtype=F64))
    torch.testing.assert_close(prox_l1(x, 1.0, 0.5), torch.tensor([2.5, 0.0, -1.5, 0.0], dtype=F64))
    torch.testing.assert_close(prox_l1(x, 0.0), x)
    torch.testing.assert_close(prox_elastic_net(x, 1.0, 1.0), prox_l1(x, 1.0) / 2)
    torch.testing.assert_close(prox_l2(torch.tensor([3.0, 4.0]), 1.0), torch.tensor([2.4, 3.2]))
    torch.testing.assert_close(prox_l2(torch.tensor([-3.0]), 1.0), torch.tensor([-2.0]))
    # per-coordinate weights in prox_l1
    w = torch.tensor([0.0, 1.0, 3.0, 1.0], dtype=F64)
    torch.testing.assert_close(prox_l1(x, w), torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=F64))
    # zeros: finite values and derivatives
    z = torch.zeros(2, 4, dtype=F64)
    for f in (
        lambda v: prox_l1(v, 0.5),
        lambda v: prox_l2(v, 0.5),
        lambda v: prox_l2(v, 0.0),
        lambda v: prox_elastic_net(v, 0.5, 1.0),
        lambda v: prox_group_lasso(v, 0.5, torch.tensor([0, 0, 1, 1])),
        lambda v: prox_group_lasso(v, 0.0, torch.tensor([0, 0, 1, 1])),
    ):
        torch.testing.assert_close(f(z), z)
        assert torch.isfinite(vmap(jacrev(f))(z)).all()
        assert torch.isfinite(vmap(jacfwd(f))(z)).all()


def test_prox_l2_dim_and_batched_lam() -> None:
    x = _gen(3, 4, seed=2) * 2
    lam = torch.tensor([0.5, 1.0, 5.0], dtype=F64)
    loop = torch.stack([prox_l2(x[i], float(lam[i])) for i in range(3)])
    torch.testing.assert_close(prox_l2(x, lam), loop)
    torch.testing.assert_close(prox_l2(x.T, lam, dim=0), loop.T)
    torch.testing.assert_close(loop[2], torch.zeros(4, dtype=F64))


def test_group_lasso_conventions() -> None:
    x = _gen(2, 7, seed=3) * 2
    as_list = [torch.nonzero(GROUPS == g).flatten() for g in (0, 2, 5)]
    torch.testing.assert_close(prox_group_lasso(x, 0.9, GROUPS), prox_group_lasso(x, 0.9, as_list))
    # coordinates in no group are unpenalised
    partial = [torch.tensor([0, 2]), torch.tensor([4])]
    out = prox_group_lasso(x, 0.9, partial)
    free = [1, 3, 5, 6]
    torch.testing.assert_close(out[:, free], x[:, free])
    torch.testing.assert_close(out[:, [0, 2]], prox_l2(x[:, [0, 2]], 0.9))
    torch.testing.assert_close(out[:, [4]], prox_l2(x[:, [4]], 0.9))
    # singleton groups reduce to soft thresholding
    torch.testing.assert_close(prox_group_lasso(x, 0.9, torch.arange(7)), prox_l1(x, 0.9))
    # one group equals prox_l2; batched lam
    lam = torch.tensor([0.3, 1.2], dtype=F64)
    torch.testing.assert_close(prox_group_lasso(x, lam, torch.zeros(7, dtype=torch.int64)), prox_l2(x, lam))


def test_float32_preserved() -> None:
    x = _gen(2, 7, seed=4, dtype=torch.float32)
    for out in (
        prox_l1(x, torch.tensor(0.3, dtype=F64)),
        prox_l2(x, 0.3),
        prox_elastic_net(x, 0.3, 0.2),
        prox_group_lasso(x, 0.3, GROUPS),
    ):
        assert out.dtype == torch.float32 and out.shape == x.shape


# --------------------------------------------------------------------------------------------
# Autograd, torch.func
# --------------------------------------------------------------------------------------------


def _ops() -> dict[str, tuple]:
    x = _gen(2, 7, seed=5) * 2
    lam = torch.tensor([0.6, 0.9], dtype=F64)
    step = torch.tensor([0.8, 1.3], dtype=F64)
    return {
        "l1": (prox_l1, (x, lam[:, None], step[:, None])),
        "l2": (prox_l2, (x, lam * 3, step)),
        "elastic_net": (
            prox_elastic_net,
            (x, lam[:, None], torch.full((7,), 0.4, dtype=F64), step[:, None]),
        ),
        "group_lasso": (lambda x, lam, step: prox_group_lasso(x, lam, GROUPS, step), (x, lam, step)),
        "group_lasso_weights": (
            lambda x, w: prox_group_lasso(x, 1.0, GROUPS, weights=w),
            (x, torch.tensor([0.5, 1.0, 2.0], dtype=F64)),
        ),
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
    batched = [t.ndim >= 1 and t.shape[0] == 2 for t in rest]

    def row(i: int) -> tuple:
        return tuple(t[i] if b else t for t, b in zip(rest, batched, strict=True))

    in_dims = (0, *[0 if b else None for b in batched])
    loop = torch.stack([f(x[i], *row(i)) for i in range(2)])
    torch.testing.assert_close(vmap(f, in_dims=in_dims)(x, *rest), loop)
    jl = torch.stack([torch.autograd.functional.jacobian(lambda z, i=i: f(z, *row(i)), x[i]) for i in range(2)])
    torch.testing.assert_close(vmap(jacrev(f), in_dims=in_dims)(x, *rest), jl)
    torch.testing.assert_close(vmap(jacfwd(f), in_dims=in_dims)(x, *rest), jl)


def test_prox_l1_jacobian_closed_form() -> None:
    x = torch.tensor([2.0, -0.3, -1.5, 0.1], dtype=F64)
    lam = torch.tensor(0.5, dtype=F64)
    torch.testing.assert_close(jacrev(prox_l1)(x, lam), torch.diag(torch.tensor([1.0, 0, 1, 0], dtype=F64)))
    torch.testing.assert_close(jacrev(prox_l1, argnums=1)(x, lam), torch.tensor([-1.0, 0, 1, 0], dtype=F64))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_validation_errors() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="x must have a floating-point dtype"):
        prox_l1(torch.arange(3), 1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        prox_l1(x, -1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        prox_l2(x, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="step must be > 0"):
        prox_l1(x, 1.0, 0.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        prox_elastic_net(x, 1.0, -0.1)
    with pytest.raises(ValueError, match="lam of shape"):
        prox_l1(x, torch.ones(3))
    with pytest.raises(ValueError, match="lam of shape"):
        prox_l2(x, torch.ones(4))  # must be batch-shaped, not per coordinate
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        prox_l2(x, 1.0, dim=2)
    with pytest.raises(ValueError, match=r"groups must have shape \(n,\)"):
        prox_group_lasso(x, 1.0, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="groups must be an integer tensor"):
        prox_group_lasso(x, 1.0, torch.tensor([0.0, 1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="nonnegative group ids"):
        prox_group_lasso(x, 1.0, torch.tensor([0, -1, 1, 1]))
    with pytest.raises(ValueError, match="disjoint"):
        prox_group_lasso(x, 1.0, [torch.tensor([0, 1]), torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="out of range"):
        prox_group_lasso(x, 1.0, [torch.tensor([0, 4])])
    with pytest.raises(ValueError, match="weights must have shape"):
        prox_group_lasso(x, 1.0, torch.tensor([0, 0, 1, 1]), weights=torch.ones(3))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        prox_group_lasso(x, 1.0, torch.tensor([0, 0, 1, 1]), weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        prox_group_lasso(torch.tensor(1.0), 1.0, torch.tensor([0]))
