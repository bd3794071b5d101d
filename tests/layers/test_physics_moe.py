"""HardConstraintLayer, PhysicsConstrainedMoE, TileRouter, the soft-constraint loss, and the example."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from optlayers import ConvergenceError
from optlayers.implicit import ImplicitAdjoint, LevenbergMarquardt
from optlayers.layers.physics import (
    HardConstraintLayer,
    PhysicsConstrainedMoE,
    TileRouter,
    expert_blocks,
    hard_constraint,
    soft_constraint_loss,
)
from optlayers.solvers.pde import (
    Burgers,
    DiffusionSorption,
    Grid,
    Heat,
    gather_rows,
    heat_exact,
    sample_coefficients,
)

F64 = torch.float64
# the default inner tolerance: ‖Jᵀr‖ <= atol + rtol ‖Jᵀr₀‖ with rtol = 1e-9, atol = 1e-12 (float64)
STAT_TOL = 1.1e-9
ROOT = Path(__file__).resolve().parents[2]
TIGHT = LevenbergMarquardt(damping=1e-6, rtol=1e-12, atol=1e-14, max_iter=300)


def _basis(grid: Grid, S: int = 2, N: int = 4, seed: int = 0, dtype: torch.dtype = F64,
           noise: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X, T = grid.mesh()
    t = (T - grid.t_min) / (grid.t_max - grid.t_min)
    smooth = torch.stack([torch.ones_like(X), X, torch.sin(math.pi * X) * (1 - t), X * t, torch.cos(2 * X + t)], -1)
    smooth = smooth[..., :N] + 0.1 * torch.sin(3 * X + torch.arange(S, dtype=F64)[:, None, None])[..., None]
    return (smooth + noise * torch.randn(S, grid.nx, grid.nt, N, generator=g, dtype=F64)).to(dtype)


def _u0(pde, grid: Grid, S: int = 2, seed: int = 1) -> torch.Tensor:
    return pde.initial_condition(sample_coefficients(S, generator=torch.Generator().manual_seed(seed)),
                                 grid.coords()[0])


# --------------------------------------------------------------------------- router
def test_tile_router_partition_of_unity() -> None:
    grid = Grid(17, 9)
    for router in (TileRouter((4, 1)), TileRouter((2, 2), overlap=2), TileRouter((3, 2), overlap=1)):
        w = router.weights(grid)
        assert w.shape == (router.num_experts, 17, 9)
        assert torch.allclose(w.sum(0), torch.ones(17, 9, dtype=F64))
        assert bool((w >= 0).all())
        assert torch.equal(router.regions(grid), w > 0)
    hard = TileRouter((4, 1)).weights(grid)
    assert bool(((hard == 0) | (hard == 1)).all()) and int(hard.sum((1, 2)).min()) >= 4 * 9
    soft = TileRouter((2, 1), overlap=3).weights(grid)
    assert int(((soft > 0) & (soft < 1)).sum()) == 2 * 6 * 9  # 6 blended columns, both experts
    itf = TileRouter((2, 2)).interfaces(grid)
    assert itf.count == 2 * 9 + 2 * 17  # two grid lines per interface
    assert set(itf.axis.tolist()) == {1, 2}
    with pytest.raises(ValueError, match="splits"):
        TileRouter((0, 1))
    with pytest.raises(ValueError, match="too small"):
        TileRouter((9, 1)).tiles(grid)
    assert expert_blocks(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError, match="at least one expert per rank"):
        expert_blocks(1, 2)


# --------------------------------------------------------------------------- layers
def test_hard_constraint_layer_float32_network_and_gradients() -> None:
    pde = Heat()
    grid = pde.grid(16, 8)
    net = nn.Linear(2, 5)
    X, T = grid.mesh(torch.float32)
    basis = net(torch.stack([X, T], -1)).expand(3, -1, -1, -1)
    u0 = _u0(pde, grid, S=3).float()
    layer = HardConstraintLayer(pde, grid, n_points=50)
    res = layer.solve(basis, u0, generator=torch.Generator().manual_seed(0))
    assert res.solution.shape == (3, 5) and res.solution.dtype == torch.float32
    assert res.aux.u.shape == (3, 16, 8) and res.aux.u.dtype == torch.float32
    assert res.aux.stationarity.shape == (3, 1) and float(res.aux.stationarity.max()) <= STAT_TOL
    layer.physics_loss(res, u0).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    u = layer(basis.detach(), u0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(u, res.aux.u.detach())


def test_single_expert_mixture_equals_hard_constraint_layer() -> None:
    pde = Burgers(nu=0.05)
    grid = pde.grid(16, 10)
    basis, u0 = _basis(grid), _u0(pde, grid)
    layer = HardConstraintLayer(pde, grid, n_points=60)
    moe = PhysicsConstrainedMoE(pde, grid, TileRouter((1, 1)), n_points=60)
    colloc = layer.sample(torch.Generator().manual_seed(2))
    a, b = layer.solve(basis, u0, collocation=colloc), moe.solve(basis, u0, collocation=colloc)
    assert torch.allclose(a.solution, b.solution[:, 0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(a.aux.u, b.aux.u) and float(b.aux.interface_jump.abs().max()) == 0.0
    assert torch.allclose(layer.physics_loss(a, u0), moe.physics_loss(b, u0))
    assert torch.allclose(layer.physics_loss(a, u0), soft_constraint_loss(pde, a.aux.u, grid, u0))


@pytest.mark.parametrize("pde", [Burgers(nu=0.05), DiffusionSorption()], ids=lambda p: type(p).__name__)
def test_mixture_solves_every_expert_to_tolerance_as_one_batch(pde) -> None:
    grid = pde.grid(20, 10)
    basis, u0 = _basis(grid), _u0(pde, grid)
    moe = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 2)), n_points=120)
    colloc = moe.sample(torch.Generator().manual_seed(3))
    res = moe.solve(basis, u0, collocation=colloc)
    assert res.solution.shape == (2, 4, 4) and res.converged.shape == (2, 4)
    assert bool(res.converged.all()) and float(res.aux.stationarity.max()) <= STAT_TOL
    # the batched solve equals each expert solved on its own rows
    rows = gather_rows(basis, u0, colloc.select(2, 3), grid)
    alone = hard_constraint(pde, rows, solver=TIGHT)
    assert torch.allclose(alone.solution[:, 0], res.solution[:, 2], rtol=1e-5, atol=1e-7)
    # the field is the indicator-weighted sum of the experts' fields
    phi = moe.weights()
    assert torch.allclose(res.aux.u, (res.aux.expert_u * phi).sum(1))
    assert bool((res.aux.interface_jump > 0).all())


def _mixture_loss(moe, basis, u0, colloc, target):
    res = moe.solve(basis, u0, collocation=colloc)
    return (res.aux.u * target).sum() + moe.physics_loss(res, u0)


@pytest.mark.parametrize("pde", [Burgers(nu=0.05), DiffusionSorption()], ids=lambda p: type(p).__name__)
def test_mixture_exact_gradient_matches_central_differences(pde) -> None:
    grid = pde.grid(16, 8)
    basis, u0 = _basis(grid), _u0(pde, grid)
    moe = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1)), n_points=50, solver=TIGHT)
    colloc = moe.sample(torch.Generator().manual_seed(4))
    target = torch.randn(2, 16, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    b = basis.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_mixture_loss(moe, b, u0, colloc, target), b)
    gen, eps = torch.Generator().manual_seed(6), 1e-6
    for _ in range(2):
        v = torch.randn(basis.shape, generator=gen, dtype=F64)
        with torch.no_grad():
            fd = (_mixture_loss(moe, basis + eps * v, u0, colloc, target)
                  - _mixture_loss(moe, basis - eps * v, u0, colloc, target)) / (2 * eps)
        assert abs(float((grad * v).sum() - fd)) <= 1e-5 * abs(float(fd))


def test_mixture_gradcheck_small_instance() -> None:
    pde = Burgers(nu=0.05)
    grid = pde.grid(8, 6)
    base, u0 = _basis(grid, S=1, N=3), _u0(pde, grid, S=1)
    directions = torch.randn(4, *base.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    moe = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1)), n_points=10, solver=TIGHT)
    colloc = moe.sample(torch.Generator().manual_seed(8))

    def f(theta: torch.Tensor) -> torch.Tensor:
        return moe(base + torch.einsum("j,j...->...", theta, directions) * 0.1, u0, collocation=colloc)

    assert torch.autograd.gradcheck(f, (torch.zeros(4, dtype=F64, requires_grad=True),), eps=1e-6, atol=1e-6,
                                    rtol=1e-4)


def test_gradient_modes_agree_where_they_should() -> None:
    grid = Heat().grid(16, 8)
    basis = _basis(grid)
    for pde, same in ((Heat(), True), (Burgers(nu=0.05), False)):
        u0 = _u0(pde, grid)
        grads = []
        for kw in ({}, {"hessian": "gauss_newton"}, {"adjoint": ImplicitAdjoint()}):
            moe = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1)), n_points=50, solver=TIGHT, **kw)
            b = basis.clone().requires_grad_(True)
            res = moe.solve(b, u0, generator=torch.Generator().manual_seed(9))
            grads.append(torch.autograd.grad(moe.physics_loss(res, u0), b)[0])
        assert torch.allclose(grads[0], grads[2], rtol=1e-6, atol=1e-9)  # exact: preconditioned == matrix-free
        assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9) == same  # GN exact only for linear r


def test_continuity_rows_and_overlap_shrink_the_interface_jump() -> None:
    pde = Burgers(nu=0.05)
    grid = pde.grid(20, 10)
    basis, u0 = _basis(grid, N=5, noise=0.0), _u0(pde, grid)
    gen = lambda: torch.Generator().manual_seed(10)  # noqa: E731
    plain = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1)), n_points=80).solve(basis, u0, generator=gen())
    joined = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1)), n_points=80, continuity_weight=1.0)
    res = joined.solve(basis, u0, generator=gen())
    assert bool(res.converged.all()) and float(res.aux.stationarity.max()) <= STAT_TOL
    assert bool((res.aux.interface_jump < plain.aux.interface_jump).all())
    # overlapping tiles: the blended field has no jump where the hard tiles had one
    over = PhysicsConstrainedMoE(pde, grid, TileRouter((2, 1), overlap=3), n_points=80).solve(basis, u0,
                                                                                            generator=gen())
    # the kink at the tile edge (between x indices 9 and 10): the step there minus its neighbours' mean
    kink = lambda u: float((u[:, 10] - u[:, 9] - 0.5 * (u[:, 11] - u[:, 8]) / 1.5).abs().max())  # noqa: E731
    assert kink(over.aux.u) < 0.1 * kink(plain.aux.u)
    assert bool((over.aux.interface_jump < plain.aux.interface_jump).all())  # the experts also agree better
    b = basis.clone().requires_grad_(True)
    joined.physics_loss(joined.solve(b, u0, generator=gen()), u0).backward()
    assert torch.isfinite(b.grad).all()


def test_soft_constraint_loss() -> None:
    pde = Heat()
    grid = pde.grid(48, 48)
    a = torch.tensor([[1.0, -0.3]], dtype=F64)
    u = heat_exact(pde, a, grid)
    assert float(soft_constraint_loss(pde, u, grid, u[..., 0])) < 1e-4
    wrong = u + 0.1 * torch.rand(u.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert float(soft_constraint_loss(pde, wrong, grid, u[..., 0])) > 1.0
    # expert fields with a partition of unity: identical experts give the plain loss
    phi = TileRouter((3, 1), overlap=2).weights(grid)
    stacked = wrong.unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.allclose(soft_constraint_loss(pde, stacked, grid, u[..., 0], weights=phi),
                          soft_constraint_loss(pde, wrong, grid, u[..., 0]))
    with pytest.raises(ValueError, match="weights"):
        soft_constraint_loss(pde, stacked, grid, u[..., 0])


def test_module_state_and_errors(tmp_path: Path) -> None:
    pde = DiffusionSorption()
    grid = pde.grid(16, 8)
    moe = PhysicsConstrainedMoE(pde, grid, (2, 1), n_points=40, hessian="gauss_newton")
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.router == moe.router and loaded.pde == pde and loaded.hessian == "gauss_newton"
    loaded.load_state_dict(moe.state_dict())
    basis, u0 = _basis(grid), _u0(pde, grid)
    colloc = moe.sample(torch.Generator().manual_seed(0))
    assert torch.equal(moe(basis, u0, collocation=colloc), loaded(basis, u0, collocation=colloc))
    with pytest.raises(ConvergenceError, match="PhysicsConstrainedMoE.*MAX_ITER"):
        PhysicsConstrainedMoE(pde, grid, (2, 1), n_points=40, solver=LevenbergMarquardt(max_iter=1))(basis, u0)
    with pytest.raises(ValueError, match="expert parallelism"):
        PhysicsConstrainedMoE(pde, grid, (2, 1), continuity_weight=1.0, process_group="world")
    with pytest.raises(ValueError, match="basis must be"):
        moe(basis[:, :5], u0)
    with pytest.raises(TypeError, match="PDE1D"):
        HardConstraintLayer("heat", grid)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- example
def test_example_quick(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "physics_moe.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    rows = {r["method"]: r for r in json.loads(line[len("RESULT "):])["rows"]}
    assert set(rows) == {"soft", "hc", "hc_KN", "moe"}
    assert all(math.isfinite(r["rel_l2_mean"]) for r in rows.values())
    assert rows["moe"]["jump"] > 0 and rows["moe"]["stationarity"] <= STAT_TOL
    assert rows["hc"]["rel_l2_mean"] < rows["soft"]["rel_l2_mean"]
    assert "rel. L2" in proc.stdout and (tmp_path / "physics_moe.png").stat().st_size > 0
