r"""``CvxpyLayer``: a drop-in replacement for ``cvxpylayers.torch.CvxpyLayer``.

Same constructor and call signature as cvxpylayers, so switching is a one-line import change::

    from optlayers.layers import CvxpyLayer        # was: from cvxpylayers.torch import CvxpyLayer
    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    (x_star,) = layer(A_t, b_t, solver_args={"eps": 1e-10})

**QP/LP path.** A DPP problem that CVXPY canonicalizes to

.. math::

    \min_x \tfrac12 x^\top P(\theta) x + q(\theta)^\top x \quad\text{s.t.}\quad
    A(\theta) x + b(\theta) \in \{0\}^{k} \times \mathbb{R}_+^{m}

(zero and nonnegative cones only) is canonicalized **once**, at construction, with
``problem.get_problem_data(solver=CLARABEL)`` (inside CVXPY's ``quad_form_dpp_scope``, so a
parametric ``quad_form(x, P)`` objective is accepted). The affine maps
:math:`\theta \mapsto (P, q, A, b)` are kept as sparse coordinate lists, applied at call time as
one batched gather/scatter (``index_add``) per data block — no per-instance Python loop — and
the resulting batch of QPs is solved by :func:`~optlayers.layers.qp` (batched interior point,
implicit KKT gradients). Nothing on this path calls cvxpylayers, diffcp or ``Problem.solve``.

**Delegate path.** Other cone programs (second-order, semidefinite, exponential and power cones)
and geometric programs (``gp=True``) are passed to ``cvxpylayers.torch.CvxpyLayer`` when it is
installed; otherwise construction raises an ``ImportError`` naming the package to install.
:attr:`CvxpyLayer.backend` says which path a layer uses.

``solver_args`` on the QP path maps the keys cvxpylayers users pass onto
:class:`~optlayers.solvers.InteriorPoint` (``eps`` → ``rtol`` and ``atol``, ``eps_abs`` →
``atol``, ``eps_rel`` → ``rtol``, ``max_iters`` → ``max_iter``) and also accepts the
``InteriorPoint`` field names; any other key raises a ``ValueError`` listing the valid ones.

References:
    Agrawal, Amos, Barratt, Boyd, Diamond & Kolter, "Differentiable Convex Optimization Layers",
    NeurIPS 2019 (arXiv:1910.12430). Agrawal, Barratt, Boyd, Busseti & Moursi, "Differentiating
    through a cone program", 2019.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._result import Result
from ...solvers.qp.interior_point import InteriorPoint
from .qp_layer import qp

__all__ = ["CvxpyLayer"]

#: solver_args keys accepted on the QP path and the InteriorPoint fields they set.
SOLVER_ARG_KEYS: dict[str, tuple[str, ...]] = {
    "eps": ("rtol", "atol"),
    "eps_abs": ("atol",),
    "eps_rel": ("rtol",),
    "max_iters": ("max_iter",),
    "max_iter": ("max_iter",),
    "rtol": ("rtol",),
    "atol": ("atol",),
    "infeasibility_tol": ("infeasibility_tol",),
    "regularization": ("regularization",),
    "refine": ("refine",),
    "step_fraction": ("step_fraction",),
}

_INSTALL_HINT = ("this problem is not a QP/LP (it has second-order, semidefinite, exponential or power "
                 "cones, or is a geometric program), so CvxpyLayer delegates it to cvxpylayers, which is "
                 "not installed: pip install 'optlayers[cvxpy]' (or pip install cvxpylayers)")


def _import_cvxpy() -> Any:
    try:
        import cvxpy as cp
    except ImportError as err:  # pragma: no cover - cvxpy is an extra
        raise ImportError("CvxpyLayer needs cvxpy: pip install 'optlayers[cvxpy]'") from err
    return cp


def _reshape_fortran(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Reshape the trailing dimension of ``t`` to ``shape`` in column-major (Fortran) order."""
    lead = t.shape[:-1]
    if len(shape) <= 1:
        return t.reshape(*lead, *shape)
    rev = tuple(reversed(shape))
    out = t.reshape(*lead, *rev)
    nl = len(lead)
    perm = list(range(nl)) + [nl + i for i in reversed(range(len(shape)))]
    return out.permute(*perm)


def _flatten_fortran(t: torch.Tensor, nbatch: int) -> torch.Tensor:
    """Flatten all but the first ``nbatch`` dimensions in column-major (Fortran) order."""
    core = t.dim() - nbatch
    if core <= 1:
        return t.reshape(*t.shape[:nbatch], -1)
    perm = list(range(nbatch)) + [nbatch + i for i in reversed(range(core))]
    return t.permute(*perm).reshape(*t.shape[:nbatch], -1)


@dataclasses.dataclass
class _Block:
    """One data block: ``value = const + Σ vals · θ[cols]`` scattered at ``rows``."""

    name: str
    size: int
    const: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray


@dataclasses.dataclass
class _Recover:
    source: str  # "primal" or "dual"
    start: int
    size: int
    shape: tuple[int, ...]


@dataclasses.dataclass
class _ParamSlot:
    col: int
    size: int
    shape: tuple[int, ...]
    triu: tuple[np.ndarray, np.ndarray] | None


def _coo(mat: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = mat.tocoo()
    return np.asarray(m.row, dtype=np.int64), np.asarray(m.col, dtype=np.int64), np.asarray(m.data, dtype=np.float64)


def _canonicalize(problem: Any, parameters: list[Any], variables: list[Any], canon_backend: str | None
                  ) -> tuple[list[_Block], list[_ParamSlot], list[_Recover], int, int, int, int] | None:
    """Canonicalize to a parametrized QP; None when the problem has other cones."""
    cp = _import_cvxpy()
    from cvxpy.utilities import scopes

    scope = scopes.quad_form_dpp_scope() if hasattr(scopes, "quad_form_dpp_scope") else contextlib.nullcontext()
    with scope:
        data, chain, _ = problem.get_problem_data(solver=cp.CLARABEL, gp=False, canon_backend=canon_backend)
    pp = data[cp.settings.PARAM_PROB]
    dims = data["dims"]
    other_cones = [getattr(dims, name, None) or [] for name in ("soc", "psd", "p3d", "pnd")]
    if any(len(c) for c in other_cones) or int(getattr(dims, "exp", 0) or 0):
        return None
    if data.get("lower_bounds") is not None or data.get("upper_bounds") is not None \
            or getattr(pp, "lb_tensor", None) is not None or getattr(pp, "ub_tensor", None) is not None:
        return None
    n_zero, n_nonneg = int(dims.zero), int(dims.nonneg)
    nv = int(pp.x.size)
    R = n_zero + n_nonneg
    K = int(pp.total_param_size)

    param_map = {k: v[0] for k, v in chain.compose_param_id_map().items()}
    var_map_raw = chain.compose_var_id_map()
    if any(len(v) > 1 for v in var_map_raw.values()):
        return None
    var_map = {k: v[0] for k, v in var_map_raw.items()}

    blocks: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = {
        k: ([], [], []) for k in ("Q", "p", "A", "b", "G", "h")}
    sizes = {"Q": nv * nv, "p": nv, "A": n_zero * nv, "b": n_zero, "G": n_nonneg * nv, "h": n_nonneg}

    def add(name: str, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        blocks[name][0].append(rows)
        blocks[name][1].append(cols)
        blocks[name][2].append(vals)

    if pp.P is not None:
        r, c, v = _coo(pp.P)
        i, j = r % nv, r // nv
        add("Q", i * nv + j, c, v)
    r, c, v = _coo(pp.q)
    keep = r < nv
    add("p", r[keep], c[keep], v[keep])
    if R:
        r, c, v = _coo(pp.A)
        i, j = r % R, r // R
        # CVXPY's cone form is  A_cvx x + b_cvx ∈ K:  equalities  -A_cvx x = b_cvx,
        # inequalities  -A_cvx x <= b_cvx.
        mat, eq = j < nv, i < n_zero
        add("A", (i * nv + j)[mat & eq], c[mat & eq], -v[mat & eq])
        add("G", ((i - n_zero) * nv + j)[mat & ~eq], c[mat & ~eq], -v[mat & ~eq])
        add("b", i[~mat & eq], c[~mat & eq], v[~mat & eq])
        add("h", (i - n_zero)[~mat & ~eq], c[~mat & ~eq], v[~mat & ~eq])

    out_blocks = []
    for name, (rows_l, cols_l, vals_l) in blocks.items():
        rows = np.concatenate(rows_l) if rows_l else np.zeros(0, np.int64)
        cols = np.concatenate(cols_l) if cols_l else np.zeros(0, np.int64)
        vals = np.concatenate(vals_l) if vals_l else np.zeros(0)
        const = np.zeros(sizes[name])
        is_const = cols == K
        np.add.at(const, rows[is_const], vals[is_const])
        nz = ~is_const & (vals != 0)
        out_blocks.append(_Block(name, sizes[name], const, rows[nz], cols[nz], vals[nz]))

    slots = []
    for p in parameters:
        pid = param_map.get(p.id, p.id)
        if pid not in pp.param_id_to_col:
            raise ValueError(f"parameter {p.name()} does not appear in the canonicalized problem")
        col = int(pp.param_id_to_col[pid])
        triu = None
        if getattr(p, "_has_dim_reducing_attr", False) and p.id in param_map:
            if any(p.attributes.get(a) for a in ("symmetric", "PSD", "NSD")):
                triu = np.triu_indices(p.shape[-1])
            else:
                raise NotImplementedError(
                    f"parameter {p.name()} has a dimension-reducing attribute (diag, sparsity, ...) "
                    "that CvxpyLayer does not handle")
        size = len(triu[0]) if triu is not None else int(p.size)
        slots.append(_ParamSlot(col=col, size=size, shape=tuple(p.shape), triu=triu))

    constr_map = chain.compose_constr_id_map() if hasattr(chain, "compose_constr_id_map") else {}
    constr_slices: dict[int, tuple[int, int]] = {}
    start = 0
    for c in pp.constraints:
        constr_slices[c.id] = (start, int(c.size))
        start += int(c.size)
    primal = set(problem.variables())
    dual_parent = {dv.id: con for con in problem.constraints for dv in con.dual_variables}
    recover = []
    for var in variables:
        if var in primal:
            if var.is_symmetric() and len(var.shape) >= 2 and var.shape[0] > 1:
                return None  # symmetric variables are stored in svec form: leave them to cvxpylayers
            vid = var_map.get(var.id, var.id)
            recover.append(_Recover("primal", int(pp.var_id_to_col[vid]), int(var.size), tuple(var.shape)))
        else:
            con = dual_parent[var.id]
            cid = constr_map.get(con.id, con.id)
            if isinstance(cid, (list, tuple)):
                cid = cid[0]
            if cid not in constr_slices:
                return None
            cstart, _ = constr_slices[cid]
            offset = 0
            for dv in con.dual_variables:
                if dv.id == var.id:
                    break
                offset += dv.size
            recover.append(_Recover("dual", cstart + offset, int(var.size), tuple(var.shape)))
    return out_blocks, slots, recover, nv, n_zero, n_nonneg, K


class CvxpyLayer(nn.Module):
    r"""A differentiable convex optimization layer with the interface of cvxpylayers.

    Maps parameter values :math:`\theta` to a solution of the DPP problem,

    .. math::

        \theta \mapsto x^\star(\theta) = \operatorname*{argmin}_x f_0(x; \theta)
        \quad\text{s.t.}\quad f_i(x; \theta) \le 0,\ g_j(x;\theta) = 0,

    with :math:`\partial x^\star / \partial \theta` from the implicit function theorem: on the
    QP/LP path, applied to the KKT conditions of the canonical QP (see the module docstring); on
    the delegate path, cvxpylayers' differentiation of the cone program.

    Args:
        problem: A DPP-compliant ``cvxpy.Problem``.
        parameters: The ``cvxpy.Parameter`` objects, in the order their values are passed.
        variables: The ``cvxpy.Variable`` objects (or constraint dual variables) to return.
        solver: ``None`` (the batched interior point for QPs/LPs, cvxpylayers' default otherwise),
            an :class:`~optlayers.solvers.InteriorPoint` config, or a cvxpylayers solver name
            (then the layer always delegates to cvxpylayers with that solver).
        gp: Geometric program (delegated to cvxpylayers).
        verbose: Passed to cvxpylayers on the delegate path (the QP path never prints).
        canon_backend: CVXPY canonicalization backend.
        solver_args: Default solver arguments (see the module docstring), overridable per call.
        throw: QP path: raise :class:`~optlayers.ConvergenceError` naming the failing batch
            indices when an element is infeasible, unbounded or unsolved (cvxpylayers raises too).

    Raises:
        ValueError: If the problem is not DPP, the parameters do not match ``problem.parameters()``
            or ``solver_args`` has an unknown key.
        ImportError: If the problem needs cvxpylayers and it is not installed.

    Example:
        >>> import cvxpy as cp, torch
        >>> from optlayers.layers import CvxpyLayer
        >>> x = cp.Variable(2); A = cp.Parameter((3, 2)); b = cp.Parameter(3)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
        >>> layer = CvxpyLayer(prob, parameters=[A, b], variables=[x])
        >>> A_t = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
        >>> b_t = torch.randn(3, dtype=torch.float64, requires_grad=True)   # shared over the batch
        >>> (sol,) = layer(A_t, b_t)
        >>> sol.sum().backward()
        >>> layer.backend, sol.shape, A_t.grad.shape
        ('optlayers', torch.Size([4, 2]), torch.Size([4, 3, 2]))
        >>> bool((sol >= -1e-8).all())
        True
    """

    def __init__(self, problem: Any, parameters: list[Any], variables: list[Any],
                 solver: str | InteriorPoint | None = None, gp: bool = False, verbose: bool = False,
                 canon_backend: str | None = None, solver_args: dict[str, Any] | None = None,
                 *, throw: bool = True) -> None:
        super().__init__()
        _import_cvxpy()
        if not isinstance(parameters, (list, tuple)):
            raise ValueError("The layer's parameters must be provided as a list or tuple")
        if not isinstance(variables, (list, tuple)):
            raise ValueError("The layer's variables must be provided as a list or tuple")
        if set(problem.parameters()) != set(parameters):
            raise ValueError("The layer's parameters must exactly match problem.parameters")
        primal = set(problem.variables())
        duals = {dv.id for con in problem.constraints for dv in con.dual_variables}
        for v in variables:
            if v not in primal and v.id not in duals:
                raise ValueError(f"Variable {v} must be a subset of problem.variables or a constraint dual variable")
        self.parameters_ = list(parameters)
        self.variables_ = list(variables)
        self.throw = throw
        self._default_args = dict(solver_args or {})
        self._base_solver = solver if isinstance(solver, InteriorPoint) else InteriorPoint()
        self._delegate: Any = None
        self._last: Result | None = None
        canon = None
        if not gp and (solver is None or isinstance(solver, InteriorPoint)):
            qp_dpp = _is_dpp_qp(problem)
            if not qp_dpp and not problem.is_dpp():
                raise ValueError("Problem must be DPP.")
            if qp_dpp:
                canon = _canonicalize(problem, list(parameters), list(variables), canon_backend)
        if canon is None:
            if isinstance(solver, InteriorPoint):
                raise ValueError("solver=InteriorPoint(...) needs a problem that canonicalizes to a QP/LP; "
                                 "this one has other cones (or gp=True)")
            try:
                from cvxpylayers.torch import CvxpyLayer as _CL
            except ImportError as err:
                raise ImportError(_INSTALL_HINT) from err
            self._delegate = _CL(problem, parameters=list(parameters), variables=list(variables),
                                 solver=solver, gp=gp, verbose=verbose, canon_backend=canon_backend,
                                 solver_args=solver_args)
            return
        self._resolve_args(self._default_args)  # validate early
        blocks, slots, recover, nv, n_eq, n_ineq, K = canon
        self._slots, self._recover = slots, recover
        self._nv, self._n_eq, self._n_ineq, self._K = nv, n_eq, n_ineq, K
        order = np.argsort([s.col for s in slots], kind="stable")
        self._order = [int(i) for i in order]
        cols_sorted = [slots[i].col for i in self._order]
        expected = 0
        for i, c in zip(self._order, cols_sorted, strict=True):
            if c != expected:
                raise ValueError("internal: CVXPY parameter columns are not contiguous")
            expected += slots[i].size
        self._block_names = []
        self._block_param = {}
        for blk in blocks:
            self._block_names.append(blk.name)
            self.register_buffer(f"_{blk.name}_const", torch.from_numpy(blk.const), persistent=False)
            self.register_buffer(f"_{blk.name}_rows", torch.from_numpy(blk.rows), persistent=False)
            self.register_buffer(f"_{blk.name}_cols", torch.from_numpy(blk.cols), persistent=False)
            self.register_buffer(f"_{blk.name}_vals", torch.from_numpy(blk.vals), persistent=False)
            self._block_param[blk.name] = blk.rows.size > 0

    # ------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"optlayers"`` (batched interior point) or ``"cvxpylayers"`` (delegated)."""
        return "cvxpylayers" if self._delegate is not None else "optlayers"

    def _resolve_args(self, args: dict[str, Any]) -> InteriorPoint:
        unknown = sorted(k for k in args if k not in SOLVER_ARG_KEYS)
        if unknown:
            raise ValueError(f"unknown solver_args {unknown} for the optlayers QP path; valid keys: "
                             f"{sorted(SOLVER_ARG_KEYS)}")
        changes: dict[str, Any] = {}
        for k, v in args.items():
            for field in SOLVER_ARG_KEYS[k]:
                changes[field] = int(v) if field in ("max_iter", "refine") else v
        return dataclasses.replace(self._base_solver, **changes) if changes else self._base_solver

    def _theta(self, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
        if len(params) != len(self._slots):
            raise ValueError(f"A tensor must be provided for each CVXPY parameter; received {len(params)} "
                             f"tensors, expected {len(self._slots)}")
        batch: list[int] = []
        for i, (t, slot) in enumerate(zip(params, self._slots, strict=True)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"parameter {i} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() == len(slot.shape):
                if tuple(t.shape) != slot.shape:
                    raise ValueError(f"Invalid parameter shape for parameter {i}. Expected: {slot.shape}, "
                                     f"Got: {tuple(t.shape)}")
                batch.append(0)
            elif t.dim() == len(slot.shape) + 1:
                if tuple(t.shape[1:]) != slot.shape:
                    raise ValueError(f"Invalid parameter shape for parameter {i}. Expected batched shape: "
                                     f"(batch_size, {', '.join(map(str, slot.shape))}), Got: {tuple(t.shape)}")
                batch.append(int(t.shape[0]))
            else:
                raise ValueError(f"Invalid parameter dimensionality for parameter {i}. Expected "
                                 f"{len(slot.shape)} or {len(slot.shape) + 1} dimensions, Got: {t.dim()} dimensions")
        sizes = {b for b in batch if b > 0}
        if len(sizes) > 1:
            raise ValueError(f"Inconsistent batch sizes. Expected all batched parameters to have the same "
                             f"batch size, but got: {batch}")
        bshape = (sizes.pop(),) if sizes else ()
        Bn = bshape[0] if bshape else 1
        dtypes = {t.dtype for t in params}
        if len(dtypes) > 1 or not params[0].is_floating_point():
            raise TypeError(f"all parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        pieces = []
        for i in self._order:
            t, slot = params[i], self._slots[i]
            tb = t if batch[i] else t.unsqueeze(0).expand(Bn, *t.shape)
            if slot.triu is not None:
                r, c = slot.triu
                flat = tb[..., torch.as_tensor(r, device=t.device), torch.as_tensor(c, device=t.device)]
            else:
                flat = _flatten_fortran(tb, 1)
            pieces.append(flat)
        theta = torch.cat(pieces, -1) if pieces else params[0].new_zeros(Bn, 0)
        return theta, bshape

    def _block(self, name: str, theta: torch.Tensor, batched: bool) -> torch.Tensor:
        const = getattr(self, f"_{name}_const").to(theta.dtype)
        if not self._block_param[name]:
            return const
        rows = getattr(self, f"_{name}_rows")
        cols = getattr(self, f"_{name}_cols")
        vals = getattr(self, f"_{name}_vals").to(theta.dtype)
        contrib = theta[:, cols] * vals
        out = const.expand(theta.shape[0], const.shape[0]).index_add(1, rows, contrib)
        return out if batched else out[0]

    def forward(self, *params: torch.Tensor, solver_args: dict[str, Any] | None = None,
                warm_start: bool = False) -> tuple[torch.Tensor, ...]:
        """Solve for the given parameter values; returns one tensor per requested variable.

        Args:
            *params: One tensor per parameter, optionally with a leading batch dimension (batched
                and unbatched parameters mix; unbatched ones are shared).
            solver_args: Overrides of the constructor's ``solver_args``.
            warm_start: QP path: start from the previous call's solution when the batch shape
                matches (interior-point warm starts save a few iterations at most).

        Returns:
            A tuple of tensors, shaped ``(batch, *variable.shape)`` or ``variable.shape``.
        """
        if self._delegate is not None:
            return self._delegate(*params, solver_args=solver_args, warm_start=warm_start)
        res = self.solve(*params, solver_args=solver_args, warm_start=warm_start)
        return res.solution

    def solve(self, *params: torch.Tensor, solver_args: dict[str, Any] | None = None,
              warm_start: bool = False) -> Result:
        """QP path only: the full :class:`Result` (``solution`` is the tuple of variables; ``aux`` the
        :class:`~optlayers.solvers.QPAux` of the canonical QP; per-element ``status``)."""
        if self._delegate is not None:
            raise NotImplementedError("solve() is available on the optlayers QP path only; this layer "
                                      "delegates to cvxpylayers")
        args = dict(self._default_args)
        args.update(solver_args or {})
        cfg = self._resolve_args(args)
        theta, bshape = self._theta(params)
        ones = theta.new_ones(theta.shape[0], 1)
        theta1 = torch.cat([theta, ones], -1)
        batched = bool(bshape)
        nv, ne, ni = self._nv, self._n_eq, self._n_ineq
        lead = bshape
        Q = self._block("Q", theta1, batched).reshape(*lead, nv, nv) if self._block_param["Q"] \
            else self._block("Q", theta1, batched).reshape(nv, nv)
        parts = {}
        for name, shape in (("p", (nv,)), ("A", (ne, nv)), ("b", (ne,)), ("G", (ni, nv)), ("h", (ni,))):
            t = self._block(name, theta1, batched)
            parts[name] = t.reshape(*(lead if (self._block_param[name] and batched) else ()), *shape)
        Q = 0.5 * (Q + Q.transpose(-1, -2))
        init = self._last if (warm_start and self._last is not None
                              and tuple(self._last.converged.shape) == lead) else None
        res = qp(Q, parts["p"], parts["G"] if ni else None, parts["h"] if ni else None,
                 parts["A"] if ne else None, parts["b"] if ne else None,
                 solver=cfg, init=init, throw=self.throw)
        self._last = Result(solution=res.solution.detach(), converged=res.converged, iterations=res.iterations,
                            residual=res.residual, status=res.status,
                            aux=type(res.aux)(*(t.detach() for t in (res.aux.ineq_dual, res.aux.eq_dual,
                                                                      res.aux.slack))))
        x = res.solution
        if x.shape[:-1] != lead:
            x = x.expand(*lead, nv)
        dual = torch.cat([res.aux.eq_dual, res.aux.ineq_dual], -1)
        if dual.shape[:-1] != lead:
            dual = dual.expand(*lead, dual.shape[-1])
        outs = []
        for rec in self._recover:
            src = x if rec.source == "primal" else dual
            outs.append(_reshape_fortran(src[..., rec.start:rec.start + rec.size], rec.shape))
        return Result(solution=tuple(outs), converged=res.converged, iterations=res.iterations,
                      residual=res.residual, status=res.status, aux=res.aux)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, parameters={len(self.parameters_)}, variables={len(self.variables_)}"


def _is_dpp_qp(problem: Any) -> bool:
    try:
        return bool(problem.is_dpp(quad_form_dpp="qp"))
    except TypeError:  # older CVXPY without the QP-aware DPP test
        return bool(problem.is_dpp())
