"""DROLoss and GroupDROLoss modules."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from optlayers.layers.dro import DROLoss, GroupDROLoss
from optlayers.solvers.dro import ChiSquareBall, CVaR, KLBall, robust_weights


def test_dro_loss_danskin_gradient_through_a_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    loss_fn = DROLoss(ChiSquareBall(1.0))
    loss = loss_fn(model(x), y)  # default criterion: per-example cross-entropy
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # reference: sum_i p_i grad l_i with p from the detached losses
    model.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    p = robust_weights(losses.detach(), ChiSquareBall(1.0)).solution
    (p * losses).sum().backward()
    g_ref = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
    assert torch.allclose(g, g_ref, atol=1e-14)
    assert torch.allclose(loss, loss_fn.solve(model(x), y).aux.value)


def test_dro_loss_custom_criterion_and_batch_dims() -> None:
    pred = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(2, 5, dtype=torch.float64)
    loss_fn = DROLoss(KLBall(0.2), criterion=lambda a, b: (a - b) ** 2)
    out = loss_fn(pred, target)
    assert out.shape == (2,)
    out.sum().backward()
    assert pred.grad is not None
    with pytest.raises(ValueError, match="per-example"):
        DROLoss(CVaR(0.5), criterion=lambda a, b: ((a - b) ** 2).mean())(pred, target)
    with pytest.raises(TypeError, match="DRO spec"):
        DROLoss(0.5)  # type: ignore[arg-type]


def test_dro_loss_state_dict_roundtrip() -> None:
    m = DROLoss(CVaR(0.1))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m.load_state_dict(torch.load(buf))
    assert "CVaR" in repr(m)


def test_group_dro_updates_present_groups_only() -> None:
    loss_fn = GroupDROLoss(3, step_size=0.5)
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = loss_fn(losses, group_ids=torch.tensor([0, 0, 1]))
    # q = softmax(log(1/3) + eta * [1.5, 4, 0]) with group 2 absent -> no step for it
    logq = torch.log(torch.full((3,), 1 / 3, dtype=torch.float64)) + 0.5 * torch.tensor([1.5, 4.0, 0.0],
                                                                                           dtype=torch.float64)
    q = torch.softmax(logq, 0)
    assert torch.allclose(loss_fn.q, q)
    assert torch.allclose(out, q[0] * 1.5 + q[1] * 4.0)
    out.backward()
    assert torch.allclose(losses.grad, torch.stack([q[0] / 2, q[0] / 2, q[1]]))
    # eval mode: no update
    loss_fn.eval()
    before = loss_fn.q.clone()
    loss_fn(losses, group_ids=torch.tensor([0, 1, 2]))
    assert torch.equal(loss_fn.q, before)


def test_group_dro_adjustment_and_state_dict() -> None:
    loss_fn = GroupDROLoss(2, step_size=1.0, adjustment=2.0, group_counts=[100, 4])
    loss_fn(torch.zeros(4), group_ids=torch.tensor([0, 1, 0, 1]))
    # equal losses: only the adjustment C / sqrt(n_g) moves q towards the small group
    assert float(loss_fn.q[1]) > float(loss_fn.q[0])
    other = GroupDROLoss(2, step_size=1.0, adjustment=2.0, group_counts=[100, 4])
    other.load_state_dict(loss_fn.state_dict())
    assert torch.equal(other.q, loss_fn.q)
    with pytest.raises(ValueError, match="group_counts"):
        GroupDROLoss(2, adjustment=1.0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        loss_fn(torch.zeros(2), group_ids=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="integer"):
        loss_fn(torch.zeros(2), group_ids=torch.tensor([0.0, 1.0]))


def test_group_dro_with_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    loss = GroupDROLoss(2, step_size=0.1)(logits, y, group_ids=torch.tensor([0, 1, 0, 1, 1, 1]))
    loss.backward()
    assert logits.grad is not None and loss.shape == ()
