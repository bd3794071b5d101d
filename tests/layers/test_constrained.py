"""Constrained learning: convergence to CVXPY for every scheme, AL semantics, nuPI, indexed multipliers,
penalty growth, checkpointing, model multipliers, logging."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from optlayers.layers.constrained import (
    AugmentedLagrangian,
    ConstrainedOptimizer,
    ConstrainedProblem,
    Constraint,
    ConstraintState,
    GradientAscent,
    Lagrangian,
    NuPI,
    PenaltySchedule,
    ProblemState,
    QuadraticPenalty,
    kkt_residuals,
)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def qp_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, m, p = 6, 4, 2
    A = rng.standard_normal((m, n))
    b = rng.standard_normal(m) - 1.0
    C = rng.standard_normal((p, n))
    d = rng.standard_normal(p)
    return A, b, C, d


@pytest.fixture(scope="module")
def cvxpy_solution():
    cp = pytest.importorskip("cvxpy")
    A, b, C, d = qp_data()
    x = cp.Variable(A.shape[1])
    cons = [A @ x <= b, C @ x == d]
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x)), cons).solve()
    return x.value, cons[0].dual_value, cons[1].dual_value


class MinNorm(ConstrainedProblem):
    """min ½‖x‖² s.t. Ax ≤ b, Cx = d."""

    def __init__(self, form_i=None, form_e=None, dual=None):
        super().__init__()
        A, b, C, d = qp_data()
        self.A, self.b, self.C, self.d = (torch.tensor(t, dtype=DT) for t in (A, b, C, d))
        self.x = torch.nn.Parameter(torch.zeros(A.shape[1], dtype=DT))
        self.ineq = Constraint("ineq", shape=(A.shape[0],), formulation=form_i, dtype=DT, dual=dual)
        self.eq = Constraint("eq", shape=(C.shape[0],), formulation=form_e, dtype=DT, dual=dual)

    def compute(self):
        return ProblemState(0.5 * (self.x ** 2).sum(),
                            {"ineq": ConstraintState(self.A @ self.x - self.b),
                             "eq": ConstraintState(self.C @ self.x - self.d)})


CASES = [
    ("simultaneous", GradientAscent(0.15), Lagrangian(), 1500),
    ("simultaneous", NuPI(0.15, kp=0.5, ki=1.0, nu=0.2), Lagrangian(), 500),
    ("simultaneous", GradientAscent(1.0), AugmentedLagrangian(1.0), 500),
    ("alternating_primal_dual", GradientAscent(0.15), Lagrangian(), 500),
    ("alternating_primal_dual", NuPI(0.15, kp=0.5, ki=1.0, nu=0.2), Lagrangian(), 500),
    ("alternating_primal_dual", GradientAscent(1.0), AugmentedLagrangian(1.0), 500),
    ("alternating_dual_primal", GradientAscent(0.15), Lagrangian(), 500),
    ("alternating_dual_primal", NuPI(0.15, kp=0.5, ki=1.0, nu=0.2), Lagrangian(), 500),
    ("alternating_dual_primal", GradientAscent(1.0), AugmentedLagrangian(1.0), 500),
    ("extragradient", GradientAscent(0.15), Lagrangian(), 500),
    ("extragradient", GradientAscent(1.0), AugmentedLagrangian(1.0), 500),
]


@pytest.mark.parametrize("scheme,dual,form,steps", CASES,
                         ids=[f"{c[0]}-{type(c[1]).__name__}-{type(c[2]).__name__}" for c in CASES])
def test_every_scheme_converges_to_cvxpy(cvxpy_solution, scheme, dual, form, steps):
    xs, lam, mu = cvxpy_solution
    prob = MinNorm(form, form)
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.x], lr=0.15), dual=dual, scheme=scheme)
    for _ in range(steps):
        info = opt.step()
    assert np.abs(prob.x.detach().numpy() - xs).max() <= 1e-4
    assert np.abs(prob.ineq.multiplier.numpy() - lam).max() <= 1e-4
    assert np.abs(prob.eq.multiplier.numpy() - mu).max() <= 1e-4
    kkt = kkt_residuals(prob, [prob.x])
    assert float(kkt.stationarity) <= 1e-4 and float(kkt.primal_feasibility) <= 1e-4
    assert float(kkt.complementarity) <= 1e-4 and float(kkt.dual_feasibility) == 0.0
    log = info.as_dict()
    assert {"objective", "lagrangian", "ineq/violation", "ineq/strict_violation", "ineq/multiplier",
            "ineq/penalty", "ineq/feasible", "eq/multiplier"} <= set(log)


def test_quadratic_penalty_with_growth_approaches_solution():
    class Half(ConstrainedProblem):  # min ½‖x‖² s.t. x₁ + x₂ ≥ 1: x* = (½, ½), λ* = ½
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(torch.zeros(2, dtype=DT))
            sched = PenaltySchedule(factor=2.0, tol=1e-6, decrease=0.9, max_penalty=100.0)
            self.c = Constraint("ineq", formulation=QuadraticPenalty(1.0, sched), dtype=DT)

        def compute(self):
            return ProblemState(0.5 * (self.x ** 2).sum(), {"c": ConstraintState(1 - self.x.sum())})

    prob = Half()
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.x], lr=4e-3))
    for _ in range(600):
        info = opt.step()
    assert float(prob.c.penalty) == 100.0  # the schedule grew the penalty to its cap
    # the quadratic penalty is biased by O(1/c): x_i = c / (1 + 2c)
    assert torch.allclose(prob.x.detach(), torch.full((2,), 100 / 201, dtype=DT), atol=1e-6)
    assert float(info.constraints["c"].multiplier) == pytest.approx(100 / 201, abs=1e-5)


class Scalar(ConstrainedProblem):
    """A scalar constraint whose violation is a prescribed sequence (for the dual recursions)."""

    def __init__(self, form=None, kind="ineq", n=1, indexed=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=DT))
        if indexed:
            self.c = Constraint(kind, num_samples=n, formulation=form, dtype=DT)
        else:
            self.c = Constraint(kind, shape=(n,) if n > 1 else (), formulation=form, dtype=DT)
        self.indexed = indexed

    def compute(self, g, idx=None):
        viol = g + 0 * self.w
        return ProblemState(self.w ** 2, {"c": ConstraintState(viol, indices=idx)})


def test_augmented_lagrangian_dual_step_is_scaled_by_penalty():
    prob = Scalar(AugmentedLagrangian(penalty=10.0))
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.w], lr=0.1), dual=GradientAscent(lr=1.0))
    opt.step(torch.tensor(0.3, dtype=DT))
    assert float(prob.c.multiplier) == pytest.approx(3.0, abs=1e-12)  # λ ← [λ + c·g]₊ with c = 10


def test_augmented_lagrangian_is_safe_at_zero_penalty():
    for kind in ("ineq", "eq"):
        prob = Scalar(AugmentedLagrangian(penalty=0.0), kind=kind)
        prob.c.multiplier.fill_(0.5)
        opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.w], lr=0.1), dual=GradientAscent(lr=1.0))
        info = opt.step(torch.tensor(0.3, dtype=DT))
        assert torch.isfinite(info.lagrangian) and torch.isfinite(prob.w).all()
        assert float(info.lagrangian) == pytest.approx(0.5 * 0.3)  # the c → 0 limit λ·g
        assert float(prob.c.multiplier) == 0.5


def nupi_reference(e, lr, kp, ki, nu, init):
    lam, xi_prev, out = 0.0, (e[0] if init == "sgd" else 0.0), []
    for et in e:
        xi = nu * xi_prev + (1 - nu) * et
        lam = max(0.0, lam + lr * (ki * et + kp * (xi - xi_prev)))
        xi_prev = xi
        out.append(lam)
    return out


@pytest.mark.parametrize("init", ["sgd", "zeros"])
def test_nupi_matches_scalar_recursion(init):
    e = [0.5, 0.3, -0.2, 0.4, 0.1, -0.6, 0.2]
    rule = NuPI(lr=0.1, kp=1.0, ki=1.0, nu=0.5, init=init)
    prob = Scalar()
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.w], lr=0.1), dual=rule)
    got = []
    for et in e:
        opt.step(torch.tensor(et, dtype=DT))
        got.append(float(prob.c.multiplier))
    assert np.allclose(got, nupi_reference(e, 0.1, 1.0, 1.0, 0.5, init), atol=1e-15)


RULES = [GradientAscent(0.1), NuPI(0.1, kp=1.0, ki=1.0, nu=0.5), NuPI(0.1, kp=0.7, ki=0.3, nu=0.2, init="zeros")]


@pytest.mark.parametrize("form", [Lagrangian(), AugmentedLagrangian(2.0, PenaltySchedule(factor=1.5, tol=1e-3))])
@pytest.mark.parametrize("rule", RULES, ids=["ga", "nupi-sgd", "nupi-zeros"])
@pytest.mark.parametrize("scheme", ["simultaneous", "alternating_dual_primal"])
def test_dense_and_indexed_multipliers_are_bit_identical(form, rule, scheme):
    n = 5
    gen = torch.Generator().manual_seed(0)
    seq = [torch.randn(n, generator=gen, dtype=DT) for _ in range(12)]
    dense, indexed = Scalar(form, n=n), Scalar(form, n=n, indexed=True)
    od = ConstrainedOptimizer(dense, torch.optim.SGD([dense.w], lr=0.1), dual=rule, scheme=scheme)
    oi = ConstrainedOptimizer(indexed, torch.optim.SGD([indexed.w], lr=0.1), dual=rule, scheme=scheme)
    for g in seq:
        od.step(g)
        oi.step(g, torch.arange(n))
        assert torch.equal(dense.c.multiplier, indexed.c.multiplier)
        assert torch.equal(dense.c.penalty, indexed.c.penalty)


def test_indexed_multipliers_have_lazy_state():
    prob = Scalar(n=6, indexed=True)
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.w], lr=0.1), dual=NuPI(0.1, kp=1.0, ki=1.0, nu=0.5))
    opt.step(torch.tensor([1.0, 2.0], dtype=DT), torch.tensor([1, 4]))
    lam = prob.c.multiplier.clone()
    assert lam[[0, 2, 3, 5]].abs().max() == 0 and (lam[[1, 4]] > 0).all()
    st = opt.state_dict()["dual"]["c"]
    assert st["seen"].tolist() == [False, True, False, False, True, False]
    opt.step(torch.tensor([0.5], dtype=DT), torch.tensor([0]))  # index 0 starts its own recursion
    assert float(prob.c.multiplier[0]) == pytest.approx(0.05)
    assert torch.equal(prob.c.multiplier[[1, 4]], lam[[1, 4]])


def test_penalty_grows_only_without_progress():
    sched = PenaltySchedule(factor=2.0, tol=1e-3, decrease=0.5, max_penalty=100.0)
    prob = Scalar(AugmentedLagrangian(1.0, sched))
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.w], lr=0.1), dual=GradientAscent(1.0))
    opt.step(torch.tensor(1.0, dtype=DT))  # first observation: prev = inf → grows
    c1 = float(prob.c.penalty)
    opt.step(torch.tensor(0.1, dtype=DT))  # big decrease → no growth
    assert float(prob.c.penalty) == c1
    opt.step(torch.tensor(0.09, dtype=DT))  # stagnation → grows
    assert float(prob.c.penalty) == 2 * c1
    for _ in range(20):
        opt.step(torch.tensor(0.09, dtype=DT))
    assert float(prob.c.penalty) == 100.0


class Classifier(ConstrainedProblem):
    def __init__(self, form, indexed=False, n=64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DT)
        self.rate = Constraint("ineq", formulation=form, dtype=DT)
        self.margin = Constraint("ineq", num_samples=n, dtype=DT)

    def compute(self, X, y, idx):
        logits = self.net(X).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        rate = torch.sigmoid(logits).mean() - 0.3
        strict = (logits > 0).to(DT).mean() - 0.3
        margin = 0.1 - logits * (2 * y - 1)
        return ProblemState(loss, {"rate": ConstraintState(rate, strict),
                                   "margin": ConstraintState(margin, indices=idx)})


def test_checkpoint_resumes_trajectory_exactly():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 3, generator=gen, dtype=DT)
    y = (X[:, 0] > 0).to(DT)
    batches = [torch.randperm(64, generator=gen)[:16] for _ in range(20)]

    def make():
        prob = Classifier(AugmentedLagrangian(0.5, PenaltySchedule(factor=1.2, tol=1e-3)))
        opt = ConstrainedOptimizer(prob, torch.optim.Adam(prob.net.parameters(), lr=1e-2),
                                   dual=NuPI(0.05, kp=1.0, ki=1.0, nu=0.3), scheme="alternating_dual_primal")
        return prob, opt

    prob, opt = make()
    for b in batches[:10]:
        opt.step(X[b], y[b], b)
    buf = io.BytesIO()
    torch.save({"problem": prob.state_dict(), "opt": opt.state_dict()}, buf)
    for b in batches[10:]:
        opt.step(X[b], y[b], b)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    prob2, opt2 = make()
    prob2.load_state_dict(ck["problem"])
    opt2.load_state_dict(ck["opt"])
    for b in batches[10:]:
        opt2.step(X[b], y[b], b)
    for (k, v), (k2, v2) in zip(prob.state_dict().items(), prob2.state_dict().items(), strict=False):
        assert k == k2 and torch.equal(v, v2), k
    assert opt2.steps == opt.steps == 20


def test_model_predicted_multipliers():
    class Pointwise(ConstrainedProblem):
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(torch.zeros(8, dtype=DT))
            model = torch.nn.Linear(1, 1).to(DT)
            torch.nn.init.zeros_(model.weight)
            torch.nn.init.zeros_(model.bias)
            self.c = Constraint("ineq", model=model, dtype=DT)
            self.t = torch.linspace(0, 1, 8, dtype=DT)

        def compute(self):
            # min ½‖x‖² s.t. x_i ≥ t_i: λ_i = t_i (linear in t, so the linear model can represent it)
            state = ConstraintState(self.t - self.x, features=self.t[:, None])
            return ProblemState(0.5 * (self.x ** 2).sum(), {"c": state})

    prob = Pointwise()
    opt = ConstrainedOptimizer(prob, torch.optim.SGD([prob.x], lr=0.2), dual=GradientAscent(0.2))
    for _ in range(800):
        info = opt.step()
    # the predicted multipliers enforce the pointwise constraints and grow with t (as λ_i = t_i does)
    assert (prob.x.detach() >= prob.t - 0.05).all()
    lam = info.constraints["c"].multiplier
    assert (lam >= 0).all() and (lam.diff() >= 0).all() and float(lam[-1]) > 0.5


def test_state_dict_round_trip_and_errors():
    prob = MinNorm(AugmentedLagrangian(3.0), Lagrangian())
    prob.ineq.multiplier.fill_(0.25)
    prob2 = copy.deepcopy(MinNorm(AugmentedLagrangian(3.0), Lagrangian()))
    prob2.load_state_dict(prob.state_dict())
    assert torch.equal(prob2.ineq.multiplier, prob.ineq.multiplier) and float(prob2.ineq.penalty[0]) == 3.0
    with pytest.raises(ValueError, match="scheme"):
        ConstrainedOptimizer(prob, torch.optim.SGD([prob.x], lr=0.1), scheme="sideways")
    with pytest.raises(ValueError, match="kind"):
        Constraint("le")
    with pytest.raises(ValueError, match="extragradient"):
        ConstrainedOptimizer(prob, torch.optim.SGD([prob.x], lr=0.1), dual=NuPI(), scheme="extragradient")

    class Missing(MinNorm):
        def compute(self):
            st = super().compute()
            del st.constraints["eq"]
            return st

    bad = Missing()
    with pytest.raises(KeyError, match="eq"):
        ConstrainedOptimizer(bad, torch.optim.SGD([bad.x], lr=0.1)).step()


def test_rate_constrained_example_quick(tmp_path):
    """examples/rate_constrained.py --quick: held-out rate within 0.01 of the bound, accuracy within
    2 points of the best feasible threshold classifier."""
    import importlib.util
    import pathlib

    pytest.importorskip("sklearn")
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "rate_constrained.py"
    spec = importlib.util.spec_from_file_location("rate_constrained_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--out", str(tmp_path)])
    assert out["test_positive_rate"] <= out["rate_bound"] + 0.01
    assert out["test_accuracy"] >= out["best_feasible_threshold_accuracy"] - 0.02
    assert (tmp_path / "rate_constrained.json").exists()
