"""Batch mixing in the training loop: torchvision v2 MixUp / CutMix with soft targets.

``create_batch_mixer`` returns a callable ``(x, y) -> (x_mixed, targets)`` that the loop applies
to each normalised batch; targets become ``(N, C)`` class probabilities, which every imgpipe
loss accepts (see ``imgpipe.losses``). Metrics are unaffected: validation never mixes.

Partners:
- ``instance``: torchvision's own pairing (each image with its neighbour in the shuffled batch);
- ``balanced``: the second image of every pair is drawn class-uniformly from the run's partner
  pool (``imgpipe.data.partner_pool``), re-augmented, so a class's chance of being mixed in is
  1/C whatever its frequency (Balanced-MixUp, Galdran et al. 2021; Remix, Chou et al. 2020).

Every random choice (apply or not, λ, CutMix box, partner rows, partner augmentation) comes
from a generator seeded by ``(seed, epoch, rank)``, so a run is reproducible and does not
disturb the global RNG (dropout, init) of the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from imgpipe.config import Augment, MixConfig
from imgpipe.constants import LABEL, PIXELS
from imgpipe.data.transforms import Preprocess, augment_batch, normalize

if TYPE_CHECKING:  # imported where used: every train worker imports this module
    from torchvision.transforms import v2


def create_mix_transform(cfg: MixConfig, num_classes: int) -> v2.Transform:
    """torchvision's ``MixUp``, ``CutMix``, or a 50/50 ``RandomChoice`` of both (timm's switch)."""
    from torchvision.transforms import v2

    ops: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not ops:
        raise ValueError("mix: set mixup_alpha or cutmix_alpha > 0")
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


class BalancedPartners:
    """Class-uniform draws from a fixed pool: class ``c ~ U(classes in pool)``, then a row of c."""

    def __init__(self, labels: np.ndarray, num_classes: int) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("partner pool is empty")
        order = np.argsort(labels, kind="stable")
        self._rows = torch.from_numpy(order)
        counts = np.bincount(labels, minlength=num_classes)
        self.classes = torch.from_numpy(np.flatnonzero(counts))  # classes present
        self._start = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self._count = torch.from_numpy(counts)

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` pool row indices (int64), class-balanced."""
        cls = self.classes[torch.randint(len(self.classes), (n,), generator=generator)]
        offset = (torch.rand(n, generator=generator, dtype=torch.float64)
                  * self._count[cls]).long()
        return self._rows[self._start[cls] + offset]


class BatchMixer:
    """Applies MixUp / CutMix to a batch; see the module docstring."""

    def __init__(self, cfg: MixConfig, num_classes: int, seed: int, rank: int,
                 preprocess: Preprocess, augment: Augment | None = None,
                 pool: dict[str, np.ndarray] | None = None) -> None:
        if cfg.partner == "balanced" and pool is None:
            raise ValueError("mix.partner=balanced needs a partner pool")
        self.cfg, self.num_classes = cfg, num_classes
        self.seed, self.rank = seed, rank
        self.pre, self.augment = preprocess, augment
        self.transform = create_mix_transform(cfg, num_classes)
        self.pool_pixels = pool[PIXELS] if pool is not None else None
        self.partners = BalancedPartners(pool[LABEL], num_classes) if pool is not None else None
        self.pool_labels = torch.as_tensor(pool[LABEL]) if pool is not None else None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed from ``(seed, epoch, rank)``: an epoch's draws do not depend on earlier ones."""
        key = np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]
        self.generator = torch.Generator().manual_seed(int(key))

    def _partner_batch(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        rows = self.partners.draw(n, self.generator).numpy()
        pixels = self.pool_pixels[rows]
        if self.augment is not None:
            pixels = augment_batch(pixels, self.augment, self.pre, self.generator)
        x = normalize(torch.from_numpy(pixels), self.pre).to(device)
        return x, self.pool_labels[rows].to(device)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mix a normalised batch ``x (N, C, H, W)`` with int labels ``y (N,)``.

        Returns ``(x_mixed, targets)``: targets ``(N, num_classes)`` float rows summing to 1 (a
        batch left unmixed by ``prob`` gets one-hot targets, so the loss sees one form).
        """
        if len(y) == 0:
            return x, y
        apply = float(torch.rand((), generator=self.generator)) < self.cfg.prob
        fork_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        if not apply:
            return x, torch.nn.functional.one_hot(y, self.num_classes).float()
        if self.partners is None:
            return self._mix(x, y, fork_seed)
        px, py = self._partner_batch(len(y), x.device)
        # torchvision pairs row i with row i-1 (``roll(1, 0)``): interleave (partner_i, x_i)
        # so every odd row is x_i mixed with its own partner (weight λ on x_i), keep those.
        both_x = torch.stack([px, x], 1).flatten(0, 1)
        both_y = torch.stack([py, y], 1).flatten()
        mixed_x, mixed_y = self._mix(both_x, both_y, fork_seed)
        return mixed_x[1::2].contiguous(), mixed_y[1::2].contiguous()

    def _mix(self, x: Tensor, y: Tensor, fork_seed: int) -> tuple[Tensor, Tensor]:
        # torchvision draws λ and the CutMix box from the global RNG: fork and seed it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fork_seed)
            return self.transform(x, y)


def create_batch_mixer(cfg: MixConfig, num_classes: int, seed: int, rank: int,
                       preprocess: Preprocess, augment: Augment | None = None,
                       pool: dict[str, Any] | None = None) -> BatchMixer | None:
    """The loop's mixing hook, or None when mixing is off (``cfg.enabled`` false)."""
    if not cfg.enabled:
        return None
    return BatchMixer(cfg, num_classes, seed, rank, preprocess, augment,
                      pool if cfg.partner == "balanced" else None)


def mixed_target_prior(prior: np.ndarray, cfg: MixConfig) -> np.ndarray:
    """The class prior of the soft targets a model is trained on, for prior correction.

    With balanced partners a batch is mixed with probability ``prob`` and the partner's share
    ``1 - λ`` has mean 1/2 (symmetric Beta), spread uniformly over the classes present:
    ``q = (1 - prob/2) · prior + (prob/2) · uniform``. Instance partners leave the prior as is.
    """
    prior = np.asarray(prior, dtype=np.float64)
    if not cfg.enabled or cfg.partner != "balanced":
        return prior
    present = (prior > 0).astype(np.float64)
    share = cfg.prob / 2
    q = (1 - share) * prior / prior.sum() + share * present / present.sum()
    return q / q.sum()
