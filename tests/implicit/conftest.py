import pytest
import torch


@pytest.fixture
def ridge_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)

    def objective(z, lam):
        return 0.5 * ((X @ z - y) ** 2).sum() + 0.5 * lam * (z ** 2).sum()

    def closed_form(lam):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(4, dtype=X.dtype), X.T @ y)

    return X, y, objective, closed_form
