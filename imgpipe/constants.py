"""Names written once: shard columns, split names, metric names and their modes."""

from __future__ import annotations

# Shard columns (Parquet).
IMAGE = "image"  # encoded image bytes (PNG/JPEG/...)
LABEL = "label"  # int64 class index
LABEL_NAME = "label_name"  # str
ID = "id"  # str, unique within a dataset

# Columns produced by the stream (decoded/tensorised).
PIXELS = "pixels"  # uint8 HxWxC after decode (cached), float CxHxW after normalisation
CORRUPT = "corrupt"  # int8 flag set by decode

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = SPLITS

MANIFEST_FILE = "manifest.json"
# Files a weights spec may name (safetensors, or a torch pickle loaded weights-only).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
SHARD_SCHEMA_VERSION = 1

# Metric names: the same everywhere (train reports, tune, results.json, bundle.json, HTTP).
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced_accuracy"
MACRO_F1 = "macro_f1"
MACRO_PRECISION = "macro_precision"
MACRO_RECALL = "macro_recall"
PER_CLASS_RECALL = "per_class_recall"
PER_CLASS_PRECISION = "per_class_precision"
PER_CLASS_F1 = "per_class_f1"

# Extended evaluation metrics (imbalanced-learn's names where it has them).
SUPPORT = "support"
PER_CLASS_SPECIFICITY = "per_class_specificity"
GEOMETRIC_MEAN = "geometric_mean"
INDEX_BALANCED_ACCURACY = "index_balanced_accuracy"
MCC = "mcc"
WEIGHTED_PRECISION = "weighted_precision"
WEIGHTED_RECALL = "weighted_recall"
WEIGHTED_F1 = "weighted_f1"
PER_CLASS_ROC_AUC = "per_class_roc_auc"
MACRO_ROC_AUC = "macro_roc_auc"
PER_CLASS_AVERAGE_PRECISION = "per_class_average_precision"
MACRO_AVERAGE_PRECISION = "macro_average_precision"
NLL = "nll"
BRIER = "brier"
ECE = "ece"
RELIABILITY = "reliability"
MANY_SHOT_ACCURACY = "many_shot_accuracy"
MEDIUM_SHOT_ACCURACY = "medium_shot_accuracy"
FEW_SHOT_ACCURACY = "few_shot_accuracy"
SHOT_CLASSES = "shot_classes"
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
EPOCH = "epoch"

# Objectives a search or early stopping may optimise, and their direction.
METRIC_MODES: dict[str, str] = {
    MACRO_F1: "max",
    BALANCED_ACCURACY: "max",
    ACCURACY: "max",
    VAL_LOSS: "min",
}
DEFAULT_OBJECTIVE = MACRO_F1


def val_key(metric: str) -> str:
    """Name under which a validation metric is reported to Train/Tune (``val_macro_f1``)."""
    return f"val_{metric}"

# Transferability scores (imgpipe.transfer.scores), each also with a class-balanced variant;
# named here so configs can be validated without importing the scoring code.
TRANSFER_SCORES = ("logme", "leep", "nce", "hscore", "knn", "linear_probe")
BALANCED_SUFFIX = "_balanced"
TRANSFER_SCORE_NAMES = tuple(n for base in TRANSFER_SCORES for n in (base, base + BALANCED_SUFFIX))

# Optimizers (the registry in training/optim.py builds each; config validates against these).
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")
# losses.LOSSES and training's mix partners; the config and the search space offer these
LOSS_NAMES = ("ce", "focal", "logit-adjusted")
MIX_PARTNERS = ("instance", "balanced")

# Deployment priors a bundle/evaluation accepts besides an explicit vector (imgpipe.bundle), and
# the binary decision-threshold rules (imgpipe.calibrate); configs validate against these.
PRIOR_CHOICES = ("model", "balanced", "train")
THRESHOLD_MODES = ("max_f1", "recall")

# loop_config key of a one-rank run: {"decoded": the decoded train split, "plan": StreamPlan};
# the rank builds each epoch's stream itself (several ranks read Train's streaming_split).
LOCAL_STREAM = "local_stream"
