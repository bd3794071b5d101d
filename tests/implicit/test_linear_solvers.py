"""Tests of the batched matrix-free linear solvers (optlayers.implicit.linear_solvers)."""

from __future__ import annotations

import pytest
import torch

from optlayers._result import Result, Status
from optlayers.implicit.linear_solvers import (
    CG,
    GMRES,
    MINRES,
    Auto,
    BiCGStab,
    Dense,
    LinearOperator,
    LinearSolver,
    Neumann,
    NormalCG,
    resolve_linear_solver,
)

B = 3
DTYPES = [torch.float64, torch.float32]
SIZES = [1, 2, 5, 13, 30]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny batched matmuls are dominated by threading overhead on small shared CPUs.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Well-conditioned SPD batch (eigenvalues in [0.5, ~2.5])."""
    M = torch.randn(B, n, n, generator=_gen(seed), dtype=torch.float64)
    return (M @ M.mT / n + 0.5 * torch.eye(n, dtype=torch.float64)).to(dtype)


def sym_indefinite(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Symmetric with eigenvalues ±[0.5, 2] alternating in sign (indefinite when n > 1)."""
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=_gen(seed), dtype=torch.float64))
    lam = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    lam = lam * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
    return (Q @ torch.diag_embed(lam.expand(B, n)) @ Q.mT).to(dtype)


def nonsymmetric(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Nonsymmetric, well conditioned: 2 I + 0.7 G / sqrt(n)."""
    G = torch.randn(B, n, n, generator=_gen(seed), dtype=torch.float64)
    return (2 * torch.eye(n, dtype=torch.float64) + 0.7 * G / n**0.5).to(dtype)


def rhs(n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, n, generator=_gen(seed), dtype=torch.float64).to(dtype)


def matvec_only(A: torch.Tensor, **tags: bool) -> LinearOperator:
    """An operator known only through its action (no transpose)."""
    return LinearOperator(matvec=lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), rmatvec=None,
                          batch=A.shape[0], n=A.shape[-1], dtype=A.dtype, device=A.device, **tags)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float(((x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)).max())


def tol_for(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


def assert_solved(result: Result, A: torch.Tensor, b: torch.Tensor, ridge: float = 0.0) -> None:
    assert result.solution.shape == b.shape
    for field in (result.converged, result.iterations, result.residual, result.status):
        assert field.shape == (b.shape[0],)
    assert result.iterations.dtype == torch.int64 and result.status.dtype == torch.int64
    assert bool(result.converged.all()), (result.status, result.residual, result.iterations)
    assert bool((result.status == Status.SUCCESS).all())
    n = A.shape[-1]
    ref = torch.linalg.solve(A.double() + ridge * torch.eye(n, dtype=torch.float64), b.double())
    assert rel_err(result.solution, ref) < tol_for(b.dtype)


# --------------------------------------------------------------------------- accuracy

SPD_SOLVERS = [CG(), MINRES(), GMRES(), GMRES(restart=4), BiCGStab(), NormalCG(), Dense(),
               Dense("cholesky"), Auto(), Auto(dense_max_n=0)]
SYM_SOLVERS = [MINRES(), GMRES(), BiCGStab(), NormalCG(), Dense(), Dense("qr"), Auto(dense_max_n=0)]
GEN_SOLVERS = [GMRES(), GMRES(restart=5), BiCGStab(), NormalCG(), Dense(), Dense("lu"), Dense("qr"),
               Auto(), Auto(dense_max_n=0)]


def _ids(solvers: list[LinearSolver]) -> list[str]:
    return [f"{type(s).__name__}{i}" for i, s in enumerate(solvers)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SPD_SOLVERS, ids=_ids(SPD_SOLVERS))
def test_spd_matches_solve(solver: LinearSolver, dtype: torch.dtype) -> None:
    for n in SIZES:
        A, b = spd(n, dtype, seed=n), rhs(n, dtype, seed=100 + n)
        op = LinearOperator.from_dense(A, positive_definite=True)
        assert_solved(solver(op, b), A, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SYM_SOLVERS, ids=_ids(SYM_SOLVERS))
def test_symmetric_indefinite_matches_solve(solver: LinearSolver, dtype: torch.dtype) -> None:
    for n in SIZES:
        A, b = sym_indefinite(n, dtype, seed=n), rhs(n, dtype, seed=100 + n)
        assert_solved(solver(LinearOperator.from_dense(A, symmetric=True), b), A, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", GEN_SOLVERS, ids=_ids(GEN_SOLVERS))
def test_nonsymmetric_matches_solve(solver: LinearSolver, dtype: torch.dtype) -> None:
    for n in SIZES:
        A, b = nonsymmetric(n, dtype, seed=n), rhs(n, dtype, seed=100 + n)
        assert_solved(solver(LinearOperator.from_dense(A), b), A, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", [CG(ridge=0.3), MINRES(ridge=0.3), GMRES(ridge=0.3),
                                    BiCGStab(ridge=0.3), NormalCG(ridge=0.3), Dense(ridge=0.3),
                                    Auto(ridge=0.3)], ids=lambda s: type(s).__name__)
def test_ridge(solver: LinearSolver, dtype: torch.dtype) -> None:
    A, b = spd(10, dtype), rhs(10, dtype)
    assert_solved(solver(LinearOperator.from_dense(A, positive_definite=True), b), A, b, ridge=0.3)


def test_ridge_regularizes_singular_system() -> None:
    A, b = _singular_psd(6, torch.float64), rhs(6, torch.float64)
    op = LinearOperator.from_dense(A, positive_definite=True)
    for solver in (CG(ridge=1e-2), Dense(ridge=1e-2), GMRES(ridge=1e-2)):
        assert_solved(solver(op, b), A, b, ridge=1e-2)


@pytest.mark.parametrize("solver", [CG(), MINRES(), GMRES(), BiCGStab(), NormalCG(), Dense()],
                         ids=lambda s: type(s).__name__)
def test_warm_start(solver: LinearSolver) -> None:
    A, b = spd(12, torch.float64), rhs(12, torch.float64)
    op = LinearOperator.from_dense(A, positive_definite=True)
    exact = torch.linalg.solve(A, b)
    hot = solver(op, b, x0=exact)
    assert bool(hot.converged.all())
    if not isinstance(solver, Dense):
        assert bool((hot.iterations == 0).all())  # the start already meets the tolerance
    near = solver(op, b, x0=exact + 1e-3 * rhs(12, torch.float64, seed=7))
    assert_solved(near, A, b)
    with pytest.raises(ValueError, match="x0"):
        solver(op, b, x0=torch.zeros(B, 11, dtype=torch.float64))


@pytest.mark.parametrize("solver", [CG(), MINRES(), GMRES(), BiCGStab(), Neumann(5, 0.2), Dense(),
                                    Auto(), Auto(dense_max_n=0)], ids=lambda s: type(s).__name__)
def test_matvec_only_operator(solver: LinearSolver) -> None:
    A, b = spd(8, torch.float64), rhs(8, torch.float64)
    tags = {"positive_definite": True} if not isinstance(solver, Neumann) else {}
    result = solver(matvec_only(A, **tags), b)
    if isinstance(solver, Neumann):
        assert bool(result.converged.all())
    else:
        assert_solved(result, A, b)


def test_normal_cg_needs_transpose() -> None:
    A, b = nonsymmetric(4, torch.float64), rhs(4, torch.float64)
    with pytest.raises(ValueError, match="transpose"):
        NormalCG()(matvec_only(A), b)
    sym = sym_indefinite(4, torch.float64)
    assert_solved(NormalCG()(matvec_only(sym, symmetric=True), b), sym, b)  # symmetric: Aᵀ = A


# --------------------------------------------------------------------------- special right-hand sides

ALL = [CG(), MINRES(), GMRES(), BiCGStab(), NormalCG(), Neumann(20, 0.3), Dense(), Auto(),
       Auto(dense_max_n=0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", ALL, ids=lambda s: type(s).__name__)
def test_zero_and_nonfinite_rhs(solver: LinearSolver, dtype: torch.dtype) -> None:
    A, b = spd(6, dtype), rhs(6, dtype)
    b = b.clone()
    b[0, 2] = float("nan")
    b[1] = 0.0
    x0 = torch.ones_like(b)
    result = solver(LinearOperator.from_dense(A, positive_definite=True), b, x0=x0)
    assert result.converged.tolist()[:2] == [False, True]
    assert int(result.status[0]) == Status.NONFINITE
    assert bool(result.solution[0].isnan().all())
    assert int(result.status[1]) == Status.SUCCESS and bool((result.solution[1] == 0).all())
    assert int(result.iterations[1]) == 0
    assert bool(result.converged[2]), "one bad element must not poison the batch"
    b[0, 2] = float("inf")
    assert int(solver(LinearOperator.from_dense(A, positive_definite=True), b).status[0]) == Status.NONFINITE


def test_nonfinite_matrix_reported() -> None:
    A, b = nonsymmetric(5, torch.float64), rhs(5, torch.float64)
    A = A.clone()
    A[0, 1, 1] = float("nan")
    for solver in (GMRES(), BiCGStab(), Dense()):
        result = solver(LinearOperator.from_dense(A), b)
        assert not bool(result.converged[0]) and int(result.status[0]) == Status.NONFINITE
        assert bool(result.converged[1:].all())


# --------------------------------------------------------------------------- failures

def _singular_psd(n: int, dtype: torch.dtype) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=_gen(3), dtype=torch.float64))
    lam = torch.linspace(0.0, 3.0, n, dtype=torch.float64)  # one exact zero eigenvalue
    return (Q @ torch.diag_embed(lam.expand(B, n)) @ Q.mT).to(dtype)


FAILED = {int(Status.SINGULAR), int(Status.BREAKDOWN), int(Status.STAGNATION), int(Status.MAX_ITER)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", [CG(), MINRES(), GMRES(), BiCGStab(), NormalCG(), Dense(),
                                    Dense("lu"), Dense("qr"), Dense("cholesky"), Auto(),
                                    Auto(dense_max_n=0)], ids=lambda s: type(s).__name__)
def test_singular_inconsistent_never_converges(solver: LinearSolver, dtype: torch.dtype) -> None:
    A, b = _singular_psd(8, dtype), rhs(8, dtype)  # random b has a null-space component
    result = solver(LinearOperator.from_dense(A, positive_definite=True), b)
    assert not bool(result.converged.any())
    assert set(result.status.tolist()) <= FAILED
    assert bool(torch.isfinite(result.residual).all())
    assert bool((result.residual > 1e-3).all())  # honest residual of the returned solution


@pytest.mark.parametrize("solver", [MINRES(), GMRES(), NormalCG()], ids=lambda s: type(s).__name__)
def test_singular_minimal_residual_methods_say_singular(solver: LinearSolver) -> None:
    A, b = _singular_psd(8, torch.float64), rhs(8, torch.float64)
    result = solver(LinearOperator.from_dense(A, symmetric=True), b)
    assert bool((result.status == Status.SINGULAR).all())
    # They stop at the least-squares residual instead of blowing up.
    lsq = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    best = (A @ lsq.unsqueeze(-1)).squeeze(-1) - b
    ratio = result.residual * b.norm(dim=-1) / best.norm(dim=-1)
    assert bool((ratio < 1.01).all())


def test_singular_nonsymmetric_dense_and_gmres() -> None:
    A, b = nonsymmetric(6, torch.float64), rhs(6, torch.float64)
    A = A.clone()
    A[:, :, 0] = A[:, :, 1]  # two equal columns
    for solver in (Dense(), Dense("qr"), GMRES(), BiCGStab(), NormalCG()):
        result = solver(LinearOperator.from_dense(A), b)
        assert not bool(result.converged.any())
        assert set(result.status.tolist()) <= FAILED
    assert bool((Dense()(LinearOperator.from_dense(A), b).status == Status.SINGULAR).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_cg_on_indefinite_breaks_down(dtype: torch.dtype) -> None:
    A, b = sym_indefinite(10, dtype), rhs(10, dtype)
    result = CG()(LinearOperator.from_dense(A, symmetric=True), b)
    assert not bool(result.converged.any())
    assert bool((result.status == Status.BREAKDOWN).all())


def test_cholesky_on_indefinite() -> None:
    A, b = sym_indefinite(6, torch.float64), rhs(6, torch.float64)
    op = LinearOperator.from_dense(A, symmetric=True)
    assert bool((Dense("cholesky")(op, b).status == Status.BREAKDOWN).all())
    assert_solved(Dense("auto")(op, b), A, b)  # falls back to LU


def test_auto_recovers_from_wrong_positive_definite_tag() -> None:
    A, b = sym_indefinite(10, torch.float64), rhs(10, torch.float64)
    result = Auto(dense_max_n=0)(LinearOperator.from_dense(A, positive_definite=True), b)
    assert_solved(result, A, b)  # CG breaks down, GMRES takes over


@pytest.mark.parametrize("solver", [CG(max_iter=1), MINRES(max_iter=1), GMRES(max_iter=1),
                                    BiCGStab(max_iter=1), NormalCG(max_iter=1),
                                    Auto(dense_max_n=0, max_iter=1)], ids=lambda s: type(s).__name__)
def test_max_iter_one(solver: LinearSolver) -> None:
    A, b = spd(12, torch.float64), rhs(12, torch.float64)
    result = solver(LinearOperator.from_dense(A, positive_definite=True), b)
    assert not bool(result.converged.any())
    assert bool((result.status == Status.MAX_ITER).all())
    assert bool((result.iterations == 1).all())


@pytest.mark.parametrize("solver", [CG(), BiCGStab(), GMRES()], ids=lambda s: type(s).__name__)
def test_per_element_freezing(solver: LinearSolver) -> None:
    """Elements converge independently: an easy element stops early, a hard one continues."""
    n = 20
    A = spd(n, torch.float64).clone()
    A[0] = 2 * torch.eye(n, dtype=torch.float64)  # one iteration suffices
    b = rhs(n, torch.float64)
    result = solver(LinearOperator.from_dense(A, positive_definite=True), b)
    assert_solved(result, A, b)
    assert int(result.iterations[0]) == 1 and bool((result.iterations[1:] > 1).all())


def test_callback() -> None:
    seen: list[tuple[int, tuple[int, ...]]] = []
    A, b = spd(5, torch.float64), rhs(5, torch.float64)
    CG(callback=lambda k, r: seen.append((k, tuple(r.shape))))(
        LinearOperator.from_dense(A, positive_definite=True), b)
    assert seen and seen[0] == (1, (B,)) and [k for k, _ in seen] == list(range(1, len(seen) + 1))


# --------------------------------------------------------------------------- Neumann

@pytest.mark.parametrize("dtype", DTYPES)
def test_neumann_error_decreases_with_terms(dtype: torch.dtype) -> None:
    A, b = spd(10, dtype), rhs(10, dtype)
    L = float(torch.linalg.eigvalsh(A.double()).max())
    op = LinearOperator.from_dense(A, positive_definite=True)
    exact = torch.linalg.solve(A.double(), b.double())
    errors = []
    for terms in (1, 5, 20, 80):
        result = Neumann(terms, 1.5 / L)(op, b)
        assert bool(result.converged.all()) and bool((result.iterations == terms).all())
        errors.append(rel_err(result.solution, exact))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:], strict=False))
    assert errors[-1] < (1e-6 if dtype == torch.float64 else 1e-4)


def test_neumann_warm_start_and_rtol() -> None:
    A, b = spd(10, torch.float64), rhs(10, torch.float64)
    op = LinearOperator.from_dense(A, positive_definite=True)
    exact = torch.linalg.solve(A, b)
    x0 = exact + 1e-2 * rhs(10, torch.float64, seed=5)
    cold, warm = Neumann(10, 0.3)(op, b), Neumann(10, 0.3)(op, b, x0=x0)
    assert rel_err(warm.solution, exact) < rel_err(cold.solution, exact)
    strict = Neumann(10, 0.3, rtol=1e-10)(op, b)  # a short series misses a tight tolerance
    assert not bool(strict.converged.any()) and bool((strict.status == Status.MAX_ITER).all())
    assert bool(Neumann(400, 0.3, rtol=1e-10)(op, b).converged.all())


def test_neumann_divergence_is_reported() -> None:
    A, b = spd(10, torch.float64), rhs(10, torch.float64)
    L = float(torch.linalg.eigvalsh(A).max())
    result = Neumann(40, 3.0 / L)(LinearOperator.from_dense(A, positive_definite=True), b)
    assert not bool(result.converged.any())  # α > 2/L: the series diverges


# --------------------------------------------------------------------------- configs

def test_validation() -> None:
    bad = [
        (lambda: CG(rtol=-1.0), "rtol"), (lambda: CG(atol=float("nan")), "atol"),
        (lambda: CG(max_iter=0), "max_iter"), (lambda: MINRES(ridge=-1.0), "ridge"),
        (lambda: GMRES(restart=0), "restart"), (lambda: BiCGStab(max_iter=2.5), "max_iter"),
        (lambda: NormalCG(rtol="x"), "rtol"), (lambda: Neumann(0), "terms"),
        (lambda: Neumann(10, -1.0), "alpha"), (lambda: Neumann(10, 0.1, rtol=-2.0), "rtol"),
        (lambda: Dense("svd"), "method"), (lambda: Dense(refine=-1), "refine"),
        (lambda: Auto(dense_max_n=-1), "dense_max_n"), (lambda: Auto(max_iter=True), "max_iter"),
    ]
    for make, field in bad:
        with pytest.raises(ValueError, match=field):
            make()


def test_configs_are_frozen_and_keyword_only() -> None:
    solver = CG(rtol=1e-8)
    with pytest.raises(AttributeError):
        solver.rtol = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        CG(1e-8)  # type: ignore[misc]
    assert Neumann(7, 0.5) == Neumann(terms=7, alpha=0.5)
    assert Dense("LU").method == "lu"
    assert GMRES(restart=50)(LinearOperator.from_dense(nonsymmetric(3, torch.float64)),
                             rhs(3, torch.float64)).converged.all()  # restart clipped to n


def test_shape_and_dtype_checks() -> None:
    A = spd(4, torch.float64)
    op = LinearOperator.from_dense(A, positive_definite=True)
    with pytest.raises(ValueError, match="shape"):
        CG()(op, torch.zeros(B, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        CG()(op, torch.zeros(B, 4, dtype=torch.float32))


def test_resolve_linear_solver() -> None:
    expected = {"cg": CG, "minres": MINRES, "gmres": GMRES, "bicgstab": BiCGStab,
                "normal_cg": NormalCG, "neumann": Neumann, "dense": Dense, "auto": Auto}
    for name, cls in expected.items():
        assert type(resolve_linear_solver(name)) is cls
        assert type(resolve_linear_solver(name.upper())) is cls
    solver = GMRES(restart=3)
    assert resolve_linear_solver(solver) is solver
    with pytest.raises(ValueError, match="bicgstab"):
        resolve_linear_solver("lsqr")
    with pytest.raises(ValueError, match="valid names"):
        resolve_linear_solver(3)  # type: ignore[arg-type]


def test_differentiable_through_iterations() -> None:
    """Out-of-place iterations: autograd through an unrolled solve matches the exact gradient."""
    A, b = spd(6, torch.float64), rhs(6, torch.float64).requires_grad_()
    op = LinearOperator.from_dense(A, positive_definite=True)
    exact = torch.autograd.grad(torch.linalg.solve(A, b).square().sum(), b)[0]
    for solver in (CG(), GMRES(), BiCGStab(), Dense()):
        grad = torch.autograd.grad(solver(op, b).solution.square().sum(), b)[0]
        assert rel_err(grad, exact) < 1e-8
