"""Does the monitor catch shifts, and only shifts? Replay held-out images through the real app.

    python benchmarks/drift_bench.py --bundle runs/bench/bundles/shapes/v1 --data runs/bench/shapes \
        --reps 20 --n 500 --out bench-results/drift_bench.json

1. Start a local Ray instance (dashboard on 127.0.0.1) and deploy the Serve app from a config
   (``serving.app:build_app``, prediction log on) through Serve's REST API.
2. Replay every test image once clean and once corrupted (Gaussian blur + noise), one image per
   POST /v1/predict, class by class; the log rows of each phase are matched to it by time, and
   checked to be one row per image. A subset is served twice to check that a logged row is a
   pure function of the image (the model is deterministic).
3. Scenarios, ``--reps`` windows of ``--n`` rows each, drawn without replacement from the logged
   rows: (a) the training prior, (b) the reversed (tail-heavy) prior, (c) the training prior on
   corrupted images. Because the row of an image does not depend on when it is served, drawing
   logged rows is the same as serving those images again; windows of one scenario overlap in
   images (one test pool), so repetitions are not independent draws from the population.
   Reference (val split) and replay pool (test split) are disjoint.
4. Each window goes through ``imgpipe.monitoring.analyze`` (alarm: prior test or drift test
   below α/2). Reported: alarm rate, each test's rejection rate, TV error of the EM/BBSE
   prior against the window's true class mix, natural and balanced accuracy.
5. Under (b): ``--apply-prior`` for real — the first window's EM prior is pushed to the app via
   Serve's REST API (user_config → reconfigure) and that window's images are served again.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.runtime import free_port


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="the bundle's prepared data (val → reference, "
                   "test → replay)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--n", type=int, default=500, help="requests per window")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--per-class", type=int, default=300, help="test images replayed per class "
                   "(each window draws without replacement, so ≥ n · max prior)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/drift_bench", help="log and scratch folder")
    p.add_argument("--out", default="bench-results/drift_bench.json")
    return p


def corrupt(png: bytes, seed: int) -> bytes:
    """Gaussian blur (radius 1) plus pixel noise (σ = 25): a camera/site change."""
    from PIL import Image, ImageFilter

    img = Image.open(io.BytesIO(png))
    img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
    arr = arr + np.random.default_rng(seed).normal(0, 25, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def deploy(dashboard: str, port: int, bundle: str, log: str) -> None:
    """Config-deploy the app (so ``--apply-prior`` can reconfigure it in place) and wait."""
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [{
        "name": "imgpipe", "route_prefix": "/", "import_path": "serving.app:build_app",
        "args": {"bundle": str(Path(bundle).resolve()), "num_cpus": 0.5, "max_ongoing_requests": 64,
                 "prediction_log": {"location": log, "flush_interval_s": 1.0}},
        "deployments": [{"name": "ImgpipeModel",
                         "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}}]}]}
    ServeSubmissionClient(dashboard).deploy_applications(config)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        app = serve.status().applications.get("imgpipe")
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {app.message}")
        time.sleep(2)
    raise TimeoutError("the app did not start in 600 s")


def serve_all(url: str, images: list[bytes], concurrency: int) -> list[str]:
    """POST each image once; the served labels in order (raises on any non-200)."""
    import httpx

    with httpx.Client(base_url=url, timeout=120,
                      limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        def one(png: bytes) -> str:
            r = client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})
            r.raise_for_status()
            return r.json()["predictions"][0]["label"]

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, images))


def replay(url: str, by_class: list[list[bytes]], concurrency: int
           ) -> list[tuple[int, datetime, datetime]]:
    """Serve class after class; (class, start, end) per phase (rows are matched by time)."""
    phases = []
    for c, images in enumerate(by_class):
        start = datetime.now(timezone.utc)
        serve_all(url, images, concurrency)
        phases.append((c, start, datetime.now(timezone.utc)))
    return phases


def pool_from_log(log: str, meta, phases, expected: list[int]):
    """Logged rows of the phases as one LogWindow plus true labels; checks one row per image."""
    from imgpipe.config.specs import parse_window
    from imgpipe.monitoring.log_reader import read_window

    win = read_window(log, parse_window("7d"), meta.name, str(meta.version),
                      meta.architecture.num_classes)
    t = win.times.astype("datetime64[us]").astype(np.int64)
    idx, labels = [], []
    for (c, start, end), n in zip(phases, expected, strict=True):
        lo, hi = int(start.timestamp() * 1e6), int(end.timestamp() * 1e6)
        rows = np.flatnonzero((t >= lo) & (t <= hi))
        if len(rows) != n:
            raise AssertionError(f"class {c}: {len(rows)} log rows for {n} served images")
        idx.append(rows)
        labels += [c] * n
    return subset(win, np.concatenate(idx)), np.asarray(labels)


def subset(win, rows: np.ndarray):
    from imgpipe.monitoring.log_reader import LogWindow

    return LogWindow(win.times[rows], win.predicted[rows], win.probabilities[rows],
                     win.served_probability[rows], win.margin[rows], win.entropy[rows],
                     None if win.embeddings is None else win.embeddings[rows], win.files_read)


def draw(labels: np.ndarray, prior: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    counts = rng.multinomial(n, prior)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                           for c, k in enumerate(counts) if k])


def accuracy(labels: np.ndarray, predicted: np.ndarray, c: int) -> dict[str, float]:
    from imgpipe.monitoring.performance import per_class_recall

    rec = per_class_recall(labels, predicted, c)
    return {"accuracy": float(np.mean(labels == predicted)),
            "balanced_accuracy": float(np.nanmean(rec))}


def run_scenario(name, pool, labels, prior, meta, ref, args, rng) -> dict[str, Any]:
    from imgpipe.monitoring.analyze import AnalysisSettings, analyze
    from imgpipe.monitoring.label_shift import recalibrate, total_variation
    from imgpipe.monitoring.performance import decisions

    c = meta.architecture.num_classes
    settings = AnalysisSettings(alpha=args.alpha, n_bootstrap=0, n_permutations=args.permutations,
                                seed=args.seed)
    reps = []
    for r in range(args.reps):
        rows = draw(labels, prior, args.n, rng)
        win, y = subset(pool, rows), labels[rows]
        res = analyze(meta, ref, win, settings)
        truth = np.bincount(y, minlength=c) / len(y)
        em = np.array(list(res["label_shift"]["em"]["prior"].values()))
        bbse = np.array(list(res["label_shift"]["bbse"]["prior"].values()))
        temps = res["label_shift"]["em_recalibration"]
        # What --apply-prior serves: the prior at the calibrated T (rows here are at the
        # reference's T: nothing was pushed yet).
        adapted = decisions(recalibrate(win.probabilities, temps["temperature"]),
                            np.asarray(meta.model_prior), em)
        reps.append({"alarm": res["shift_detected"],
                     "prior_p": res["label_shift"]["test"]["p_value"],
                     "drift_p": res["drift"]["p_value"], "tv_em": total_variation(em, truth),
                     "tv_bbse": total_variation(bbse, truth), "em": em.tolist(), "rows": rows,
                     "t_ref": temps["temperature"],
                     "t_calibrated": temps["calibrated_temperature"],
                     "before": accuracy(y, win.predicted, c), "after": accuracy(y, adapted, c)})
        print(f"  {name} rep {r + 1}/{args.reps}: alarm={reps[-1]['alarm']} "
              f"p_prior={reps[-1]['prior_p']:.3g} p_drift={reps[-1]['drift_p']:.3g}", flush=True)
    half = args.alpha / 2
    mean = lambda k: float(np.mean([x[k] for x in reps]))  # noqa: E731
    return {"scenario": name, "reps": args.reps, "n": args.n,
            "alarm_rate": mean("alarm"),
            "prior_test_rejects": float(np.mean([x["prior_p"] < half for x in reps])),
            "drift_test_rejects": float(np.mean([x["drift_p"] < half for x in reps])),
            "tv_em": mean("tv_em"), "tv_bbse": mean("tv_bbse"),
            "accuracy": float(np.mean([x["before"]["accuracy"] for x in reps])),
            "balanced_accuracy": float(np.mean([x["before"]["balanced_accuracy"] for x in reps])),
            "accuracy_prior_adapted_offline": float(np.mean([x["after"]["accuracy"]
                                                             for x in reps])),
            "balanced_accuracy_prior_adapted_offline": float(np.mean(
                [x["after"]["balanced_accuracy"] for x in reps])),
            "_first": reps[0]}


def apply_prior_for_real(dashboard: str, url: str, em: list[float], temperature: float | None,
                         images: list[bytes], labels: np.ndarray, names: list[str]
                         ) -> dict[str, Any]:
    """Push ``em`` (and the recalibrated temperature) through Serve's REST API, as
    ``jobs/monitor.py --apply-prior`` does; wait for the replicas, re-serve, score."""
    import httpx

    from imgpipe.monitoring.actions import apply_prior

    apply_prior(dashboard, "imgpipe", em, temperature)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        cal = httpx.get(f"{url}/v1/models", timeout=30).json()["models"][0]["calibration"]
        if isinstance(cal["deployment_prior"], list):
            break
        time.sleep(1)
    else:
        raise TimeoutError("the app did not take the new prior")
    served = serve_all(url, images, 16)
    pred = np.array([names.index(s) for s in served])
    return accuracy(labels, pred, len(names))


HEADER = (f"{'scenario':<24} {'alarm rate':>10} {'prior test':>10} {'drift test':>10} "
          f"{'TV EM':>7} {'TV BBSE':>7} {'acc':>6} {'bal acc':>7}")


def _row(r: dict[str, Any]) -> str:
    return (f"{r['scenario']:<24} {r['alarm_rate']:>10.2f} {r['prior_test_rejects']:>10.2f} "
            f"{r['drift_test_rejects']:>10.2f} {r['tv_em']:>7.3f} {r['tv_bbse']:>7.3f} "
            f"{r['accuracy']:>6.3f} {r['balanced_accuracy']:>7.3f}")


def _load_test_images(data: str, num_classes: int) -> list[list[bytes]]:
    from imgpipe.constants import IMAGE, LABEL, TEST
    from imgpipe.data.shards import read_split_table

    t = read_split_table(data, TEST)
    images, labels = t[IMAGE].to_pylist(), t[LABEL].to_numpy()
    return [[images[i] for i in np.flatnonzero(labels == c)] for c in range(num_classes)]


def _kill_failed_sessions() -> None:
    """A failed ray.init leaves its GCS and helpers running; end the ones this process started
    (their session folder ends with our pid), never anyone else's."""
    import os

    import psutil

    tag = f"_{os.getpid()}/"
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and tag in " ".join(p.info["cmdline"] or []):
                p.kill()
        except psutil.Error:
            pass


def _init_ray():
    """ray.init with a few retries: on an overloaded machine the raylet can miss Ray's fixed
    30 s registration wait."""
    import ray

    for attempt in range(10):
        try:
            return ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                            configure_logging=False, log_to_driver=False)
        except Exception as e:
            print(f"ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()
            _kill_failed_sessions()
            time.sleep(10 * (attempt + 1))
    raise RuntimeError("could not start Ray")


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    from imgpipe.bundle import load_bundle_meta, resolve_bundle_dir
    from imgpipe.monitoring.analyze import training_prior
    from imgpipe.monitoring.reference import REFERENCE_DIR, init_reference, load_reference

    args = get_args_parser().parse_args(argv)
    bundle = resolve_bundle_dir(args.bundle)
    meta = load_bundle_meta(bundle)
    if not (bundle / REFERENCE_DIR).is_dir():
        init_reference(bundle, args.data)
    ref = load_reference(bundle)
    c, names = meta.architecture.num_classes, meta.class_names
    clean = [imgs[: args.per_class] for imgs in _load_test_images(args.data, c)]
    corrupted = [[corrupt(png, 1000 * k + i) for i, png in enumerate(imgs)]
                 for k, imgs in enumerate(clean)]
    work = Path(args.work).resolve()
    log = str(work / f"log-{int(time.time())}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ctx = _init_ray()
    dashboard = f"http://{ctx.dashboard_url}"
    t0 = time.perf_counter()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(dashboard, port, str(bundle), log)
        print(f"app up ({time.perf_counter() - t0:.0f} s); replaying {sum(map(len, clean))} "
              "clean + as many corrupted test images", flush=True)
        phases_clean = replay(url, clean, args.concurrency)
        phases_bad = replay(url, corrupted, args.concurrency)
        again = replay(url, [clean[0][:50]], args.concurrency)  # determinism check
        time.sleep(3)  # the writer flushes every second
        pool, labels = pool_from_log(log, meta, phases_clean, [len(x) for x in clean])
        bad, bad_labels = pool_from_log(log, meta, phases_bad, [len(x) for x in corrupted])
        rep, _ = pool_from_log(log, meta, again, [50])
        # Each re-served row against its closest first-pass row of the same class.
        first = pool.probabilities[labels == 0]
        same = float(np.abs(rep.probabilities[:, None, :] - first[None]).max(axis=2)
                     .min(axis=1).max())
        print(f"replayed in {time.perf_counter() - t0:.0f} s; one log row per image; "
              f"re-served rows differ by at most {same:.2e}", flush=True)
        rng = np.random.default_rng(args.seed)
        train = training_prior(meta)
        results = [run_scenario("(a) training prior", pool, labels, train, meta, ref, args, rng),
                   run_scenario("(b) reversed prior", pool, labels, train[::-1], meta, ref, args,
                                rng),
                   run_scenario("(c) corrupted inputs", bad, bad_labels, train, meta, ref, args,
                                rng)]
        # The real thing: a (b) window's images (class counts of the first repetition) served
        # before and after the first repetition's EM prior is applied to the running app.
        b = results[1]["_first"]
        counts = np.bincount(labels[b["rows"]], minlength=c)
        pick = np.random.default_rng(args.seed + 1)
        y = np.repeat(np.arange(c), counts)
        imgs = [clean[k][int(i)] for k in range(c)
                for i in pick.choice(len(clean[k]), counts[k], replace=False)]
        served = serve_all(url, imgs, args.concurrency)
        before = accuracy(y, np.array([names.index(s) for s in served]), c)
        temperature = b["t_calibrated"] if b["t_ref"] != 1.0 else None
        after = apply_prior_for_real(dashboard, url, b["em"], temperature, imgs, y, names)
    finally:
        serve.shutdown()
        ray.shutdown()
    for r in results:
        r.pop("_first")
    print("\n" + HEADER)
    for r in results:
        print(_row(r))
    print(f"\n--apply-prior under (b), one window of {args.n} served through the app before "
          f"and after: accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f}, balanced "
          f"accuracy {before['balanced_accuracy']:.3f} → {after['balanced_accuracy']:.3f} "
          f"(offline mean over reps: {results[1]['accuracy']:.3f} → "
          f"{results[1]['accuracy_prior_adapted_offline']:.3f}); EM recalibration T' = "
          f"{b['t_ref']:.3f}")
    payload = {"bundle": str(bundle), "data": args.data, "reps": args.reps, "n": args.n,
               "alpha": args.alpha, "permutations": args.permutations, "seed": args.seed,
               "determinism_max_abs_diff": same, "scenarios": results,
               "apply_prior_real_app": {"before": before, "after": after,
                                        "em_recalibration_temperature": b["t_ref"],
                                        "temperature_pushed": temperature},
               "wall_time_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"→ {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
