"""head-solver=lbfgs: the new head fitted on the cached features as an L2-regularised multinomial logistic
regression, the optimum a linear classifier can reach on the frozen features (a linear probe), in seconds.

The objective is scikit-learn's LogisticRegression's (l2, multinomial): C x the sum of the cross-entropies +
||W||^2 / 2, the bias not penalised; divided by n, the mean cross-entropy + ||W||^2 / (2 C n). For each C of
C_GRID, from the strongest regularisation up, L-BFGS with a strong Wolfe line search starts from the previous
solution (the problem is convex: the start changes the time, not the optimum). The C kept is the one with the best
validation accuracy, ties broken by the lower validation loss, as select-by=accuracy keeps epochs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from imgclf.training.evaluate import Evaluation
from imgclf.training.features import FeatureCache
from imgclf.training.metrics import RunningSums

log = logging.getLogger("imgclf.train")

C_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 5))  # 0.001 ... 100, half-decades
MAX_ITER = 300  # L-BFGS iterations per C at most


@dataclass
class Fit:
    c: float
    weight: torch.Tensor
    bias: torch.Tensor
    train_loss: float
    valid_loss: float
    valid_accuracy: float
    iterations: int


def objective(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    return functional.cross_entropy(x @ weight.T + bias, y) + weight.square().sum() / (2 * c * len(y))


def fit_one(x: torch.Tensor, y: torch.Tensor, c: float, weight: torch.Tensor, bias: torch.Tensor,
            max_iter: int = MAX_ITER) -> int:
    """Minimise `objective` for this C in place, from the given weight and bias; returns the function evaluations."""
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(weight, bias, x, y, c)
        loss.backward()
        return loss

    optimizer.step(closure)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    return optimizer.state[weight]["func_evals"]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, valid_x: torch.Tensor, valid_y: torch.Tensor,
                 num_classes: int, grid: tuple[float, ...] = C_GRID) -> tuple[Fit, list[Fit]]:
    """(the fit kept, every fit of the grid): features as (n, d) float tensors, labels as class indices."""
    weight = torch.zeros(num_classes, train_x.shape[1], device=train_x.device)
    bias = torch.zeros(num_classes, device=train_x.device)
    fits = []
    for c in sorted(grid):
        evaluations = fit_one(train_x, train_y, c, weight, bias)
        with torch.no_grad():
            train_loss = functional.cross_entropy(train_x @ weight.T + bias, train_y).item()
            logits = valid_x @ weight.T + bias
            valid_loss = functional.cross_entropy(logits, valid_y).item()
            valid_accuracy = (logits.argmax(1) == valid_y).float().mean().item()
        fits.append(Fit(c, weight.clone(), bias.clone(), train_loss, valid_loss, valid_accuracy, evaluations))
    best = max(fits, key=lambda f: (f.valid_accuracy, -f.valid_loss))
    return best, fits


def fit_head(head: nn.Module, train: FeatureCache, valid: FeatureCache) -> tuple[RunningSums, Evaluation]:
    """Fit `head` (an nn.Linear) on the cached features and set its weights to the kept C's; the train sums and the
    validation evaluation of the result, as an epoch of the training loop gives them."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head-solver=lbfgs fits a linear head; this model's head is a {type(head).__name__}")
    started = time.monotonic()
    x, vx = train.features.float().flatten(1), valid.features.float().flatten(1)
    best, fits = linear_probe(x, train.labels, vx, valid.labels, head.out_features)
    with torch.no_grad():
        head.weight.copy_(best.weight.to(head.weight.dtype))
        head.bias.copy_(best.bias.to(head.bias.dtype))
        logits = x @ best.weight.T + best.bias
        valid_logits = vx @ best.weight.T + best.bias
    log.info("head-solver=lbfgs: C=%g kept (validation accuracy %.4f, loss %.4f) of %s; %d function evaluations "
             "in %.1f s", best.c, best.valid_accuracy, best.valid_loss,
             ", ".join(f"C={f.c:g}: {f.valid_accuracy:.3f}" for f in fits), sum(f.iterations for f in fits),
             time.monotonic() - started)
    sums = RunningSums()
    sums.add(best.train_loss, logits, train.labels)
    classes = head.out_features
    confusion = torch.bincount((valid.labels * classes + valid_logits.argmax(1)).cpu(),
                               minlength=classes * classes).view(classes, classes)
    return sums, Evaluation(best.valid_loss, best.valid_accuracy, confusion)
