"""Re-balanced linear heads on frozen features (Kang et al., "Decoupling Representation and
Classifier for Long-Tailed Recognition", ICLR 2020).

All functions work on a head ``z = W f + b`` with ``W (C, D)``, ``b (C,)`` float32 tensors and
features ``f (N, D)``:

- cRT (``fit_crt``): a fresh linear head trained with class-balanced sampling;
- τ-normalisation (``tau_normalize``): ``z_c = (w_c·f + b_c) / ‖w_c‖^τ``; the bias is scaled
  with its row, so τ=0 is exactly the identity and τ-norm is LWS with fixed scales;
- LWS (``fit_lws``): learnable per-class scales ``s_c`` of the frozen head's logits, trained
  with class-balanced sampling; exported as ``W' = diag(s) W``, ``b' = s ⊙ b``.

Every head keeps the epoch with the best validation metric (as training does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from imgpipe.metrics import classification_metrics, confusion_matrix

Scorer = Callable[[Tensor], float]  # logits of the val features → metric (higher is better)


@dataclass
class Head:
    """A linear classifier head and how it was chosen."""

    weight: Tensor  # (C, D) float32
    bias: Tensor  # (C,) float32
    info: dict = field(default_factory=dict)

    def logits(self, features: Tensor) -> Tensor:
        return features @ self.weight.T + self.bias


def metric_scorer(labels: np.ndarray, num_classes: int, metric: str) -> Scorer:
    """Val-metric scorer from labels ``(N,)``: ``balanced_accuracy`` or ``macro_f1``."""

    def score(logits: Tensor) -> float:
        cm = confusion_matrix(labels, logits.argmax(1).numpy(), num_classes)
        return float(classification_metrics(cm)[metric])

    return score


def balanced_indices(labels: np.ndarray, n: int, generator: torch.Generator) -> Tensor:
    """``n`` row indices drawn class-balanced: class ~ U(classes present), then a row of it.

    Args:
        labels: (N,) int class per row. n: draws. generator: seeded torch generator.
    Raises:
        ValueError: no rows.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("no rows to sample from")
    order = torch.from_numpy(np.argsort(labels, kind="stable"))
    classes, start, count = np.unique(labels[order.numpy()], return_index=True, return_counts=True)
    pick = torch.randint(len(classes), (n,), generator=generator)
    offset = (torch.rand(n, generator=generator, dtype=torch.float64)
              * torch.from_numpy(count)[pick]).long()
    return order[torch.from_numpy(start)[pick] + offset]


def _train_balanced(params: list[Tensor], forward: Callable[[Tensor], Tensor], x: Tensor,
                    y: Tensor, score: Scorer, val_x: Tensor, *, epochs: int, batch_size: int,
                    lr: float, weight_decay: float, seed: int) -> tuple[list[Tensor], list[dict]]:
    """SGD (momentum 0.9, cosine) on class-balanced batches; returns the best params by val."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = max(1, math.ceil(len(y) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    labels = y.numpy()
    best, best_params, history = -math.inf, [p.detach().clone() for p in params], []
    for epoch in range(epochs):
        idx = balanced_indices(labels, steps * batch_size, gen).view(steps, batch_size)
        total = 0.0
        for rows in idx:
            loss = F.cross_entropy(forward(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        with torch.no_grad():
            val = score(forward(val_x))
        history.append({"epoch": epoch, "train_loss": total / steps, "val_metric": val})
        if val > best:
            best, best_params = val, [p.detach().clone() for p in params]
    return best_params, history


def fit_crt(x: Tensor, y: Tensor, num_classes: int, score: Scorer, val_x: Tensor, *,
            epochs: int = 30, batch_size: int = 128, lr: float = 0.05,
            weight_decay: float = 5e-4, seed: int = 0) -> Head:
    """Classifier re-training: a fresh linear head on frozen features, class-balanced batches.

    Features are standardised for the optimisation and the scaling folded back into the head
    (``W' = W / σ``, ``b' = b − W' μ``), so the result applies to the raw features.

    Args:
        x: (N, D) float32 train features (possibly with SMOTE rows). y: (N,) int64.
        score: val-metric scorer; val_x: (M, D) val features (selects the best epoch).
    """
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], num_classes)

    def forward(f: Tensor) -> Tensor:
        return lin((f - mu) / sd)

    (w, b), history = _train_balanced(list(lin.parameters()), forward, x, y, score, val_x,
                                      epochs=epochs, batch_size=batch_size, lr=lr,
                                      weight_decay=weight_decay, seed=seed)
    w_raw = w / sd
    return Head(w_raw, b - w_raw @ mu, {"history": history,
                                        "best_val_metric": max(h["val_metric"] for h in history)})


def tau_normalize(head: Head, tau: float) -> Head:
    """``z_c = (w_c·f + b_c) / ‖w_c‖^τ`` (Kang et al. 2020); τ=0 returns the same head values.

    Raises:
        ValueError: τ < 0.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    norms = head.weight.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scale = norms.pow(-tau) if tau > 0 else torch.ones_like(norms)
    return scale_head(head, scale, {"tau": float(tau)})


def scale_head(head: Head, scale: Tensor, info: dict | None = None) -> Head:
    """Per-class logit scales folded into the head: ``W' = diag(s) W``, ``b' = s ⊙ b``."""
    return Head(head.weight * scale[:, None], head.bias * scale, dict(info or {}))


def select_tau(head: Head, score: Scorer, val_x: Tensor, tau_max: float = 2.0,
               step: float = 0.05) -> Head:
    """τ-norm with τ on the grid ``0, step, …, tau_max`` that maximises the val metric (the
    smallest such τ on ties, so an unhelpful τ-norm stays the identity)."""
    taus = np.round(np.arange(0.0, tau_max + step / 2, step), 6)
    scores = [score(tau_normalize(head, float(t)).logits(val_x)) for t in taus]
    best = int(np.argmax(scores))  # first maximum = smallest τ
    out = tau_normalize(head, float(taus[best]))
    out.info.update({"tau_grid": taus.tolist(), "val_metric_by_tau": scores,
                     "best_val_metric": scores[best]})
    return out


def fit_lws(head: Head, x: Tensor, y: Tensor, score: Scorer, val_x: Tensor, *,
            epochs: int = 30, batch_size: int = 128, lr: float = 0.05,
            weight_decay: float = 0.0, seed: int = 0) -> Head:
    """Learnable weight scaling: logits ``s ⊙ (W f + b)`` with only ``s`` (init 1) trained on
    class-balanced batches of the train features; the frozen ``W, b`` never change."""
    w, b = head.weight.detach(), head.bias.detach()
    s = torch.ones(w.shape[0], requires_grad=True)

    def forward(f: Tensor) -> Tensor:
        return (f @ w.T + b) * s

    (best_s,), history = _train_balanced([s], forward, x, y, score, val_x, epochs=epochs,
                                         batch_size=batch_size, lr=lr,
                                         weight_decay=weight_decay, seed=seed)
    out = scale_head(head, best_s, {"scales": best_s.tolist(), "history": history})
    out.info["best_val_metric"] = max(h["val_metric"] for h in history)
    return out
