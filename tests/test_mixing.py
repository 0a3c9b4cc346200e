"""MixUp / CutMix with soft targets: the mixer, the balanced partner draw, losses, the tuner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imgpipe.config import Augment, LossConfig, MixConfig, TrainConfig, resolve_config
from imgpipe.config.search import SearchSpace
from imgpipe.constants import LABEL, PIXELS
from imgpipe.data.transforms import Preprocess
from imgpipe.losses import create_loss, imbalanced_cross_entropy
from imgpipe.training.mixing import BalancedPartners, create_batch_mixer, mixed_target_prior
from imgpipe.tuning.space import define_space, params_to_overrides

PRE = Preprocess(image_size=8, mode="L", mean=(0.5,), std=(0.5,))
NO_AUG = Augment(crop_padding=0, rotation_degrees=0.0)


def _batch(n: int = 16, num_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(num_classes, (n,), generator=g)


def _pool(counts: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """A pool whose image for class c is the constant c (so partners are recognisable)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    pixels = np.broadcast_to(labels[:, None, None, None] * 40, (len(labels), 8, 8, 1))
    return {PIXELS: np.ascontiguousarray(pixels).astype(np.uint8), LABEL: labels}


@pytest.mark.parametrize("cfg", [
    MixConfig(mixup_alpha=0.4), MixConfig(cutmix_alpha=1.0),
    MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0),
    MixConfig(mixup_alpha=1.0, partner="balanced"), MixConfig(cutmix_alpha=1.0, partner="balanced"),
])
def test_soft_targets_are_distributions_and_match_the_images(cfg):
    mixer = create_batch_mixer(cfg, 4, seed=0, rank=0, preprocess=PRE, augment=NO_AUG,
                               pool=_pool([50, 10, 3, 1]))
    x, y = _batch()
    for epoch in range(3):
        mixer.set_epoch(epoch)
        xm, t = mixer(x, y)
        assert xm.shape == x.shape and t.shape == (16, 4) and t.dtype == torch.float32
        torch.testing.assert_close(t.sum(1), torch.ones(16))
        assert (t >= 0).all()
        # the image's own class keeps weight λ >= ... > 0 and the batch is really mixed
        own = t[torch.arange(16), y]
        assert (own > 0).all() and (own < 1).any()


def test_mixup_images_are_the_convex_combination_the_targets_state():
    """Balanced partner images are constant per class: x_mixed = λ x + (1-λ) partner."""
    mixer = create_batch_mixer(MixConfig(mixup_alpha=1.0, partner="balanced"), 4, 0, 0, PRE,
                               NO_AUG, _pool([20, 5, 2, 1]))
    x, y = _batch()
    xm, t = mixer(x, y)
    # recover λ per row from the own-class weight (a partner of the same class adds to it)
    partner_value = (torch.arange(4) * 40 / 255.0 - 0.5) / 0.5  # normalised constants
    for i in range(16):
        others = [c for c in range(4) if c != int(y[i]) and t[i, c] > 0]
        if not others:  # partner of the same class: λ is not identifiable from t
            continue
        (c,) = others
        lam = 1 - float(t[i, c])
        torch.testing.assert_close(xm[i], lam * x[i] + (1 - lam) * partner_value[c])


def test_same_seed_same_mix_other_epoch_other_mix():
    cfg = MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, partner="balanced")
    x, y = _batch()

    def run(epoch):
        m = create_batch_mixer(cfg, 4, 7, 0, PRE, Augment(), _pool([9, 3, 1, 1]))
        m.set_epoch(epoch)
        return m(x, y)

    a, b, c = run(1), run(1), run(2)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[1], c[1])
    state = torch.get_rng_state()
    run(3)
    assert torch.equal(state, torch.get_rng_state())  # global RNG (dropout, init) untouched


def test_balanced_partners_hit_uniform_class_frequencies():
    """Pool with a 1000:1 class imbalance; partner classes must be uniform (chi-square)."""
    from scipy.stats import chisquare

    counts = [1000, 300, 60, 10, 1]
    partners = BalancedPartners(np.repeat(np.arange(5), counts), 5)
    rows = partners.draw(50_000, torch.Generator().manual_seed(0)).numpy()
    labels = np.repeat(np.arange(5), counts)[rows]
    freq = np.bincount(labels, minlength=5)
    assert chisquare(freq).pvalue > 1e-3  # uniform over classes
    # and uniform over the rows of a class
    head = rows[labels == 0]
    assert chisquare(np.bincount(head, minlength=1000)).pvalue > 1e-3


def test_balanced_partner_classes_in_mixed_targets_are_uniform():
    """Through the whole mixer: partner class = the non-own class with weight 1-λ."""
    from scipy.stats import chisquare

    mixer = create_batch_mixer(MixConfig(mixup_alpha=1.0, partner="balanced"), 3, 0, 0, PRE,
                               NO_AUG, _pool([500, 20, 1]))
    y = torch.zeros(512, dtype=torch.long)  # every image from the head class
    x = torch.zeros(512, 1, 8, 8)
    hits = np.zeros(3)
    for _ in range(6):
        _, t = mixer(x, y)
        hits += (t > 0).sum(0).numpy()
    partner_hits = hits[1:]
    # classes 1 and 2 are drawn 1/3 each; class 0 partners merge into the own weight
    assert chisquare(partner_hits).pvalue > 1e-3
    assert abs(partner_hits.sum() / (6 * 512) - 2 / 3) < 0.03


def _hand_soft(logits, q, weight, eps=0.0, gamma=0.0, offset=None) -> float:
    total = norm = 0.0
    num_classes = len(logits[0])
    off = offset if offset is not None else [0.0] * num_classes
    for z, qi in zip(logits, q, strict=True):
        zz = [a + b for a, b in zip(z, off, strict=True)]
        m = max(zz)
        e = [math.exp(v - m) for v in zz]
        p = [v / sum(e) for v in e]
        term = [weight[c] * (1 - p[c]) ** gamma * -math.log(p[c]) for c in range(num_classes)]
        total += (1 - eps) * sum(qi[c] * term[c] for c in range(num_classes))
        total += eps / num_classes * sum(term)
        norm += sum(qi[c] * weight[c] for c in range(num_classes))
    return total / norm


LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]]
SOFT = [[0.7, 0.3, 0.0], [0.0, 0.25, 0.75], [0.5, 0.5, 0.0]]


@pytest.mark.parametrize("kw", [
    {"name": "ce"}, {"name": "ce", "class_weights": "power:1"},
    {"name": "ce", "label_smoothing": 0.1}, {"name": "focal", "focal_gamma": 2.0},
    {"name": "focal", "class_weights": "power:0.5", "label_smoothing": 0.2},
    {"name": "logit-adjusted", "tau": 1.0}, {"name": "logit-adjusted", "class_weights": "power:0.5"},
])
def test_every_loss_takes_soft_targets_like_a_hand_computation(kw):
    counts = [100, 20, 4]
    loss = create_loss(LossConfig(**kw), counts)
    got = float(loss(torch.tensor(LOGITS), torch.tensor(SOFT)))
    weight = loss.weight.tolist() if loss.weight is not None else [1.0] * 3
    offset = None
    if kw["name"] == "logit-adjusted":
        offset = [kw.get("tau", 1.0) * math.log(n / sum(counts)) for n in counts]
    want = _hand_soft(LOGITS, SOFT, weight, kw.get("label_smoothing", 0.0), loss.gamma, offset)
    assert got == pytest.approx(want, rel=1e-5)
    # a one-hot soft target is exactly the hard-label loss
    hard = torch.tensor([0, 2, 1])
    onehot = torch.nn.functional.one_hot(hard, 3).float()
    torch.testing.assert_close(loss(torch.tensor(LOGITS), onehot), loss(torch.tensor(LOGITS), hard))


def test_mixup_loss_is_lambda_weighted_sum_of_the_two_hard_losses():
    z = torch.tensor(LOGITS)
    a, b, lam = torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0]), 0.3
    q = lam * torch.nn.functional.one_hot(a, 3) + (1 - lam) * torch.nn.functional.one_hot(b, 3)
    want = lam * torch.nn.functional.cross_entropy(z, a) + (1 - lam) * torch.nn.functional.cross_entropy(z, b)
    torch.testing.assert_close(imbalanced_cross_entropy(z, q.float()), want)


def test_soft_targets_must_be_distributions():
    z = torch.tensor(LOGITS)
    with pytest.raises(ValueError, match="sum to 1"):
        imbalanced_cross_entropy(z, torch.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="expected logits"):
        imbalanced_cross_entropy(z, torch.ones(3, 4) / 4)


def test_config_flags_and_prior():
    with pytest.raises(ValueError, match="partner"):
        MixConfig(partner="balanced")
    assert create_batch_mixer(MixConfig(), 3, 0, 0, PRE) is None
    cfg = resolve_config(TrainConfig, None, {"mix.mixup_alpha": 0.2, "mix.partner": "balanced"})
    assert cfg.mix.enabled
    prior = np.array([0.9, 0.09, 0.01])
    q = mixed_target_prior(prior, cfg.mix)
    np.testing.assert_allclose(q, 0.5 * prior + 0.5 / 3)
    np.testing.assert_allclose(mixed_target_prior(prior, MixConfig(mixup_alpha=0.2)), prior)


def test_tuner_searches_mixing():
    import optuna

    space = SearchSpace(mix=["none", "mixup", "cutmix", "both"], mix_partner=["instance", "balanced"],
                        sampler="none")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = define_space(trial, space, 10)
        cfg = resolve_config(TrainConfig, None, params_to_overrides(params, 10))
        seen.add((params["mix"], cfg.mix.partner, cfg.mix.mixup_alpha > 0, cfg.mix.cutmix_alpha > 0))
        study.tell(trial, 0.0)
    assert {m for m, *_ in seen} == {"none", "mixup", "cutmix", "both"}
    assert ("both", "balanced", True, True) in seen or ("both", "instance", True, True) in seen
    with pytest.raises(ValueError, match="search.mix"):
        SearchSpace(mix=["mixupp"])


@pytest.mark.ray
@pytest.mark.slow
def test_balanced_mixup_trains_end_to_end_with_a_seeded_partner_pool(ray_session, tiny_digits,
                                                                      tmp_path):
    from imgpipe.data.partner_pool import build_partner_pool
    from imgpipe.data.pipeline import ID_HASH, build_decoded
    from imgpipe.data.shards import load_manifest
    from imgpipe.training.trainer import run_training

    manifest = load_manifest(tiny_digits)
    counts = manifest.counts_vector("train")
    pre = manifest.preprocess(16)
    decoded, _ = build_decoded(tiny_digits, "train", pre, cache=True)
    pools = [build_partner_pool(decoded, counts, 4, seed, ID_HASH) for seed in (0, 0)]
    got = np.bincount(pools[0][LABEL], minlength=len(counts))
    np.testing.assert_array_equal(got, np.minimum(counts, 4))  # every class, the tail in full
    assert pools[0][PIXELS].shape == (got.sum(), 16, 16, 1)
    np.testing.assert_array_equal(pools[0][PIXELS], pools[1][PIXELS])  # same seed, same pool

    cfg = TrainConfig.model_validate({
        "data": tiny_digits, "out": str(tmp_path), "epochs": 2, "num_workers": 1,
        "batch_size": 32, "model": {"image_size": 16},
        "mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "partner": "balanced"},
        "optim": {"lr": 0.01}})
    res = run_training(cfg)
    hist = res["history"]
    assert len(hist) == 2 and all(math.isfinite(h["train_loss"]) for h in hist)
    assert 0 <= res["test"]["balanced_accuracy"] <= 1  # metrics on hard labels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_balanced_mix_step_on_cuda_with_amp():
    """The loop's GPU path: pool on CPU, batch on CUDA, fp16 autocast, soft-target focal loss."""
    from imgpipe.models import create_model

    dev = torch.device("cuda")
    mixer = create_batch_mixer(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, partner="balanced"),
                               4, 0, 0, PRE, Augment(), _pool([30, 8, 2, 1]))
    model = create_model("cnn", 4, in_channels=1).to(dev)
    loss_fn = create_loss(LossConfig(name="focal", class_weights="power:0.5"), [30, 8, 2, 1]).to(dev)
    x, y = _batch(64)
    xm, t = mixer(x.to(dev), y.to(dev))
    assert xm.device.type == "cuda" and t.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.float16):
        loss = loss_fn(model(xm), t)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the same batch mixed on CPU gives the same targets (draws do not depend on the device)
    mixer.set_epoch(0)
    _, t_cpu = mixer(x, y)
    torch.testing.assert_close(t.cpu(), t_cpu)
