"""head-solver=lbfgs (imgclf.training.head_solver) against scikit-learn's LogisticRegression on the same features
and the same grid of C chosen on the validation split: the same optimum, the same choice, the same accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imgclf.training import head_solver
from imgclf.training.features import FeatureCache
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from torch import nn


def clusters(n: int, classes: int = 8, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes (no perfect separation: the regularisation matters)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 0.9
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_the_fit_is_scikit_learns_logistic_regression_with_c_chosen_on_validation():
    (x, y), (vx, vy), (tx, ty) = clusters(480, seed=1), clusters(160, seed=2), clusters(320, seed=3)
    grid = (0.01, 0.1, 1.0, 10.0)
    best, fits = head_solver.linear_probe(x, y, vx, vy, 8, grid)

    reference = []
    for c in grid:
        model = LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(x.numpy(), y.numpy())
        reference.append((c, model, model.score(vx.numpy(), vy.numpy()),
                          log_loss(vy.numpy(), model.predict_proba(vx.numpy()), labels=list(range(8)))))
        ours = next(f for f in fits if f.c == c)
        # the same optimum: sklearn's coefficients score no better on our objective than ours
        theirs = head_solver.objective(torch.tensor(model.coef_, dtype=torch.float32),
                                       torch.tensor(model.intercept_, dtype=torch.float32), x, y, c).item()
        assert head_solver.objective(ours.weight, ours.bias, x, y, c).item() <= theirs + 1e-5
        assert ours.valid_accuracy == pytest.approx(reference[-1][2], abs=0.01)
    chosen = max(reference, key=lambda r: (r[2], -r[3]))
    assert best.c == chosen[0]
    test_ours = ((tx @ best.weight.T + best.bias).argmax(1) == ty).float().mean().item()
    assert test_ours == pytest.approx(chosen[1].score(tx.numpy(), ty.numpy()), abs=0.01)
    assert test_ours > 0.5  # 8 classes: chance is 0.125


def test_fit_head_sets_the_heads_weights_and_reports_an_epoch():
    (x, y), (vx, vy) = clusters(160), clusters(80, seed=5)
    head = nn.Linear(32, 8)
    sums, valid = head_solver.fit_head(head, FeatureCache(x.to(torch.bfloat16), y), FeatureCache(vx, vy))
    with torch.no_grad():
        predicted = head(vx).argmax(1)
    assert valid.accuracy == pytest.approx((predicted == vy).float().mean().item())
    assert int(valid.confusion.sum()) == 80 and int(valid.confusion.diag().sum()) == int((predicted == vy).sum())
    assert sums.seen == 160 and 0 < sums.mean_loss < np.log(8)
    with pytest.raises(TypeError, match="fits a linear head"):
        head_solver.fit_head(nn.Sequential(nn.Linear(32, 8)), FeatureCache(x, y), FeatureCache(vx, vy))


@pytest.mark.parametrize("given, cache, solver, why", [
    ({}, True, "lbfgs", "the head trains alone on cached features"),
    ({"head-solver": "sgd"}, True, "sgd", "head-solver=sgd"),
    ({"freeze": "none"}, False, "sgd", "freeze is not head"),
    ({}, False, "sgd", "the feature cache is off"),
    ({"model-ema": "true"}, True, "sgd", "model-ema averages optimizer steps"),
])
def test_the_solver_decision_and_its_reason(given, cache, solver, why):
    from imgclf import config
    from imgclf.training.job import head_solver as decide

    assert decide(config.parse_hyperparameters(given), cache)[0] == solver
    assert why in decide(config.parse_hyperparameters(given), cache)[1]


def test_lbfgs_asked_for_without_the_cache_is_a_clear_error():
    from imgclf import config
    from imgclf.errors import UserError
    from imgclf.training.job import head_solver as decide

    with pytest.raises(UserError, match="head-solver=lbfgs fits the head once on cached features, and here the "
                                        "feature cache is off: use freeze=head with feature-cache on"):
        decide(config.parse_hyperparameters({"head-solver": "lbfgs", "augment": "flip"}), False)
