"""Checks of data-dependent settings against the data, before Ray starts or any work begins.

Some values only have a meaning once the data is known: an explicit class-weight vector, a
sampler target distribution, a deployment prior (one value per class), the search overrides of
a tune run that hold such vectors, the bundle a job evaluates or serves against the data's class
list. Each job calls one ``check_*`` here right after parsing its configuration, so a wrong
length fails in a second with exit 2 and the field's name — not minutes later inside a Ray
worker. The checks run the same functions training runs (``sampling_rates``, and the counts and
class-weight functions ``create_loss`` builds the loss from), so a value accepted here is accepted
there. The train and tune checks import no torch: the job's driver never needs it (the bundle
checks of evaluate and serve import it with the bundle code).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from imgpipe.checkpoint import META_FILE, load_meta
from imgpipe.config import (
    ConfigError,
    LossConfig,
    OptimConfig,
    PrepareConfig,
    TrainConfig,
    TuneJobConfig,
)
from imgpipe.config.search import SearchSpace
from imgpipe.config.specs import parse_class_weights, parse_sampler
from imgpipe.constants import EPOCH, PRIOR_CHOICES, TRAIN
from imgpipe.data.manifest import Manifest, ManifestNotFoundError, load_manifest
from imgpipe.data.rebalance import (
    check_class_counts,
    class_weights,
    expected_epoch_counts,
    sampling_rates,
)
from imgpipe.training.steps import plan_epoch_steps

if TYPE_CHECKING:
    from imgpipe.bundle import BundleMeta

# Class counts of the embedded datasets, for a tune run that will prepare them (no manifest yet).
_DIGITS_CLASSES = 10
_FAMILIES = ("none", "power", "effective", "free")


def _fail(field: str, message: str) -> ConfigError:
    return ConfigError(f"{field}: {message}")


def _vector_length(field: str, values: tuple[float, ...] | list[float], num_classes: int,
                   what: str, names: list[str] | None) -> None:
    if len(values) != num_classes:
        listed = f" ({', '.join(names)})" if names and len(names) <= 20 else ""
        raise _fail(field, f"{what} has {len(values)} value(s) but the data has {num_classes} "
                           f"classes{listed}: give one value per class, in class order")


def check_train_against_counts(cfg: TrainConfig, counts: list[int], names: list[str] | None,
                               prefix: str = "") -> None:
    """``cfg``'s class weights, sampler and loss against per-class train ``counts``.

    Raises:
        ConfigError: ``<prefix>loss.class_weights``, ``<prefix>sampler.strategy`` or
            ``<prefix>loss`` with the reason (wrong length, mass on an absent class, ...).
    """
    n = len(counts)
    weights = parse_class_weights(cfg.loss.class_weights)
    if weights.vector is not None:
        _vector_length(f"{prefix}loss.class_weights", weights.vector, n, "the weight vector",
                       names)
    sampler = parse_sampler(cfg.sampler.strategy)
    if sampler.target is not None:
        _vector_length(f"{prefix}sampler.strategy", sampler.target, n,
                       "the target distribution", names)
    try:
        sampling_rates(counts, sampler)
    except ValueError as e:
        raise _fail(f"{prefix}sampler.strategy", str(e)) from None
    try:
        class_weights(check_class_counts(counts), cfg.loss.class_weights)
    except ValueError as e:
        raise _fail(f"{prefix}loss", str(e)) from None
    check_ranks_get_rows(counts, cfg.sampler.strategy, cfg.num_workers, f"{prefix}num_workers")


def check_ranks_get_rows(counts: list[int], strategy: str, num_workers: int, field: str) -> None:
    """Every DDP rank must get rows each epoch: the resampled epoch (``strategy``'s rates over
    ``counts``) needs at least one row per rank (``plan_epoch_steps``, which training runs).

    Raises:
        ConfigError: ``field`` with the epoch's size and the largest worker count that fits.
    """
    rows = float(expected_epoch_counts(counts, sampling_rates(counts, strategy)).sum())
    try:
        plan_epoch_steps(rows, num_workers, 1, 1)
    except ValueError:
        raise _fail(field, f"{num_workers} workers but an epoch (sampler {strategy!r}) holds "
                           f"about {rows:.0f} rows: every worker needs rows each epoch; use at "
                           f"most {max(1, int(rows))} workers") from None


def check_train_config(cfg: TrainConfig) -> Manifest:
    """The train job's data-dependent settings against ``cfg.data``'s manifest.

    Raises:
        ManifestError: no readable manifest at ``cfg.data``.
        ConfigError: naming the field that does not fit the data (``resume``: a checkpoint
            trained on other classes; ``epochs``: no more than the checkpoint already ran).
    """
    manifest = load_manifest(cfg.data)
    check_train_against_counts(cfg, manifest.counts_vector(TRAIN), manifest.class_names)
    if cfg.resume and "://" not in cfg.resume and (Path(cfg.resume) / META_FILE).is_file():
        meta = load_meta(cfg.resume)
        # A checkpoint of other classes would fail to load its classifier head in every worker.
        saved = meta.get("class_names")
        if saved is not None and list(saved) != manifest.class_names:
            raise _fail("resume", f"{cfg.resume} was trained on classes {saved}, but {cfg.data} "
                                  f"has {manifest.class_names}")
        # A resumed run starts after the checkpoint's epoch (0-based in the checkpoint).
        done = meta.get(EPOCH)
        if done is not None and int(done) + 1 >= cfg.epochs:
            raise _fail("epochs", f"{cfg.resume} already ran {int(done) + 1} epoch(s), so "
                                  f"--epochs {cfg.epochs} leaves none to train; the epoch count "
                                  f"is the run's total: give more than {int(done) + 1}")
    return manifest


def _choices(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def check_search_against_classes(search: dict[str, Any], num_classes: int,
                                 names: list[str] | None = None) -> None:
    """A tune ``search:`` section's choices: known names, and vectors of the data's length.

    Raises:
        ConfigError: ``search.<field>[i]`` for an unknown choice or a vector of wrong length.
    """
    space = SearchSpace.model_validate(search)
    known = {"optimizer": OptimConfig, "loss": LossConfig}
    for field, model in known.items():
        allowed = list(get_args(model.model_fields["name"].annotation))
        for i, choice in enumerate(_choices(getattr(space, field))):
            if choice not in allowed:
                raise _fail(f"search.{field}[{i}]", f"unknown {choice!r}; choose from {allowed}")
    for i, choice in enumerate(_choices(space.weight_family)):
        if choice not in _FAMILIES:
            raise _fail(f"search.weight_family[{i}]",
                        f"unknown {choice!r}; choose from {list(_FAMILIES)}")
    for i, choice in enumerate(_choices(space.sampler)):
        try:
            spec = parse_sampler(choice)
        except ValueError as e:
            raise _fail(f"search.sampler[{i}]", str(e)) from None
        if spec.target is not None:
            _vector_length(f"search.sampler[{i}]", spec.target, num_classes,
                           "the target distribution", names)


def _tune_classes(tcfg: TuneJobConfig) -> tuple[list[int] | None, int, list[str] | None]:
    """(train counts if known, number of classes, class names if known) of the tune data."""
    try:
        manifest = load_manifest(tcfg.data)
    except ManifestNotFoundError:
        # The job will prepare an embedded dataset here (or refuse, before Ray, elsewhere).
        n = _DIGITS_CLASSES if (tcfg.dataset or "digits-lt") == "digits-lt" else (
            PrepareConfig(dataset="shapes-lt").num_classes)
        return None, n, None
    return manifest.counts_vector(TRAIN), len(manifest.class_names), manifest.class_names


def check_tune_config(tcfg: TuneJobConfig) -> None:
    """The tune job's ``train:`` and ``search:`` sections against the data's classes.

    Raises:
        ConfigError: ``train.<field>`` or ``search.<field>[i]`` that does not fit the data.
    """
    counts, n, names = _tune_classes(tcfg)
    # trials run workers_per_trial workers whatever train.num_workers says: checked below
    train = TrainConfig.model_validate(tcfg.train).model_copy(update={"num_workers": 1})
    if counts is not None:
        check_train_against_counts(train, counts, names, prefix="train.")
    else:  # lengths can be checked already; the rest once the data is prepared
        for field, spec in (("loss.class_weights", parse_class_weights(train.loss.class_weights)),
                            ("sampler.strategy", parse_sampler(train.sampler.strategy))):
            values = getattr(spec, "vector", None) or getattr(spec, "target", None)
            if values is not None:
                _vector_length(f"train.{field}", values, n, "the vector", names)
    check_search_against_classes(tcfg.search, n, names)
    if counts is not None:
        for strategy in _choices(SearchSpace.model_validate(tcfg.search).sampler):
            check_ranks_get_rows(counts, strategy, tcfg.workers_per_trial, "workers_per_trial")


def check_prior(prior: Any, meta: BundleMeta, field: str = "prior") -> None:
    """A deployment prior (``model|balanced|train`` or one value per class) for ``meta``.

    Raises:
        ConfigError: ``<field>`` of the wrong length, negative, all zero, or ``train`` for a
            bundle without training counts.
    """
    if prior is None:
        return
    if isinstance(prior, str) and prior.strip() in PRIOR_CHOICES:
        if prior.strip() == "train" and sum(meta.train_class_counts) == 0:
            raise _fail(field, "'train' needs the bundle's training counts, which are all zero")
        return
    values = prior
    if isinstance(prior, str):
        try:
            values = [float(v) for v in prior.split(",")]
        except ValueError:
            raise _fail(field, f"expected one of {', '.join(PRIOR_CHOICES)} or one probability "
                               f"per class, got {prior!r}") from None
    _vector_length(field, values, meta.architecture.num_classes, "the prior", meta.class_names)
    from imgpipe.bundle import check_prior_vector  # torch: the train job's driver has none

    try:
        check_prior_vector([float(v) for v in values], meta.architecture.num_classes, field)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_evaluate_config(bundle: str, data: str, split: str, prior: Any) -> None:
    """``jobs/evaluate.py``: the bundle's classes equal the data's, the split exists, the prior
    fits the bundle — before any image is decoded.

    Raises:
        BundleError / ManifestError: unreadable bundle or data.
        ConfigError: ``data``, ``split`` or ``prior`` with the reason.
    """
    from imgpipe.bundle import load_bundle_meta

    meta = load_bundle_meta(bundle)
    manifest = load_manifest(data)
    if manifest.class_names != meta.class_names:
        raise _fail("data", f"{data} has classes {manifest.class_names} but the bundle was "
                            f"trained on {meta.class_names} (same names, same order needed)")
    if split not in manifest.counts:
        raise _fail("split", f"{split!r} is not in {data} (have {manifest.splits})")
    check_prior(prior, meta)


def check_serve_overrides(bundle: str, deployment_prior: Any, decision_threshold: Any) -> None:
    """``jobs/serve.py``: live overrides against the bundle, before Ray and Serve start.

    Raises:
        BundleError: unreadable bundle.
        ConfigError: ``deployment_prior`` or ``decision_threshold`` that does not fit it.
    """
    from imgpipe.bundle import load_bundle_meta

    meta = load_bundle_meta(bundle)
    check_prior(deployment_prior, meta, "deployment_prior")
    if decision_threshold is not None and meta.architecture.num_classes != 2:
        raise _fail("decision_threshold", f"only for binary models; this bundle has "
                                          f"{meta.architecture.num_classes} classes")
