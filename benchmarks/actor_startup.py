"""How long each kind of Ray actor took to create in a finished Ray session, from its logs.

    python jobs/tune.py                                   # any run; then, before the next one:
    python benchmarks/actor_startup.py                    # /tmp/ray/session_latest
    python benchmarks/actor_startup.py /tmp/ray/session_2026-12-01_... --out startup.json

For every worker process of the session, ``worker-<id>-<pid>.out`` names its actor class
(``:actor_name:``) and ``python-core-worker-<id>_<pid>.log`` times the actor's creation, from
"Creating actor" to "Actor creation task finished": process start-up is done by then, so this
is the actor's own ``__init__`` including whatever unpickling its class and arguments imports.
A Tune trial's actor is ``ImplicitFunc``; its creation is on every trial's critical path (its
Train controller starts after it). Prints the median, min and max per actor class; writes JSON.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

from imgpipe.console import write_json

STAMP = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _time(line: str) -> float | None:
    m = STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def creation_seconds(session: Path) -> dict[str, list[float]]:
    """``{actor class: [creation seconds, ...]}`` for the actors of ``session``."""
    out: dict[str, list[float]] = {}
    for stdout in (session / "logs").glob("worker-*.out"):
        pid = stdout.stem.rsplit("-", 1)[1]
        name = next((m.group(1) for line in stdout.open(errors="ignore")
                     if (m := re.match(r":actor_name:(\S+)", line))), None)
        cores = list((session / "logs").glob(f"python-core-worker-*_{pid}.log"))
        if name is None or not cores:
            continue
        created = finished = None
        for line in cores[0].open(errors="ignore"):
            if created is None and "Creating actor" in line:
                created = _time(line)
            elif finished is None and "Actor creation task finished" in line:
                finished = _time(line)
        if created is not None and finished is not None:
            out.setdefault(name, []).append(finished - created)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("session", nargs="?", default="/tmp/ray/session_latest")
    p.add_argument("--out", default="bench-results/actor_startup.json")
    args = p.parse_args(argv)
    session = Path(args.session).resolve()
    found = creation_seconds(session)
    if not found:
        raise SystemExit(f"no actor logs under {session}/logs (is it a Ray session folder?)")
    print(f"{'actor':30s} {'n':>3s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for name, secs in sorted(found.items()):
        print(f"{name:30s} {len(secs):3d} {statistics.median(secs):9.2f} {min(secs):7.2f} "
              f"{max(secs):7.2f}")
    out = write_json(args.out, {"session": str(session), "creation_s": found})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
