"""Small builders shared by tests: a saved test bundle, encoded test images, and the
process/checkpoint probes the failure drills use."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgpipe.bundle import save_bundle
from imgpipe.data.transforms import Preprocess
from imgpipe.models import create_model


def make_test_bundle(root: str | Path, name: str = "test-model", num_classes: int = 3,
                     model: str = "cnn", mode: str = "L", image_size: int = 16,
                     train_class_counts: list[int] | None = None, seed: int = 0,
                     class_names: list[str] | None = None, **meta: Any) -> Path:
    """Save a randomly initialised (seeded) ``create_model(model)`` as a bundle; return its dir.

    ``train_class_counts`` defaults to a long tail (100, 50, 25, ...); extra keyword arguments
    go to ``save_bundle`` (temperature, deployment_prior, decision_threshold, metrics, ...).
    """
    torch.manual_seed(seed)
    pre = Preprocess(image_size=image_size, mode=mode, mean=(0.5,) * (1 if mode == "L" else 3),
                     std=(0.25,) * (1 if mode == "L" else 3))
    net = create_model(model, num_classes, in_channels=pre.channels, image_size=image_size).eval()
    counts = train_class_counts or [max(1, 100 >> i) for i in range(num_classes)]
    return save_bundle(
        root, name, net.state_dict(),
        architecture={"model": model, "num_classes": num_classes, "in_channels": pre.channels},
        preprocess=pre, class_names=class_names or [f"class_{i}" for i in range(num_classes)],
        train_class_counts=counts, **meta,
    )


def encode_image(seed: int = 0, size: tuple[int, int] = (20, 24), mode: str = "RGB",
                 fmt: str = "PNG") -> bytes:
    """A random image of ``size`` (w, h) and ``mode`` encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (the pixel data stays tiny): a
    decompression-bomb probe that costs nothing to send."""
    data = bytearray(encode_image(0, size=(1, 1), mode="L"))
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered for a run (``checkpoint_manager_snapshot.json``).

    A ``checkpoint_*`` folder exists as soon as a worker has persisted it, before the controller
    has taken its report; a kill in between restarts from scratch instead of resuming. Only a
    registered checkpoint is one a restore is certain to find.
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results") or [])


def ray_actor_pids(class_name: str) -> list[int]:
    """Live Ray actor processes (``ray::<class_name>...``) that descend from this process.

    Read from the process table: the State API is too slow on a loaded host to catch an actor
    between two short epochs. Only descendants count, so other Ray instances on a shared
    machine are never touched.
    """
    import psutil

    me = os.getpid()
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(f"ray::{class_name}") and any(p.pid == me for p in proc.parents()):
                pids.append(proc.info["pid"])
        except psutil.Error:
            continue
    return sorted(pids)
