"""Long fuzz run of ``protocol.decode``: millions of random and mutated frames, across seeds.

    python fuzz/fuzz_decode.py --frames 2000000 --seconds 600 --json fuzz-report.json

Every frame must decode or raise a ProtocolError. Any other exception is a bug: the frame is written to
``--crash-dir`` (hex) with its traceback, and the exit status is 1. Also watched: the slowest single frame
(a hang shows up here) and the process's peak RSS (unbounded allocation shows up here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

from protocol.constants import DEFAULT_LIMITS, Limits
from protocol.fuzzing import FuzzReport, run_fuzz


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2_000_000, help="total frames (split over seeds)")
    ap.add_argument("--seeds", type=int, default=8, help="number of seeds (each a different corpus)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long")
    ap.add_argument("--tight", action="store_true", help="small limits, so the limit paths fire constantly")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz/crashes"))
    args = ap.parse_args(argv)

    limits = Limits(max_frame=4096, max_str=256, max_bin=2048, max_list=128, max_map=32, max_depth=6,
                    max_elements=1000, max_total_elements=3000) if args.tight else DEFAULT_LIMITS
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = rss0
    t0 = time.perf_counter()
    total = FuzzReport()
    per_seed = max(1, args.frames // args.seeds)

    def progress(rep: FuzzReport) -> None:
        nonlocal peak
        peak = max(peak, proc.memory_info().rss)
        done = total.frames + rep.frames
        print(f"{done:>10} frames  {done / (time.perf_counter() - t0):8.0f}/s  failures {len(total.failures) + len(rep.failures)}"
              f"  slowest {max(total.max_frame_seconds, rep.max_frame_seconds) * 1e3:.1f} ms"
              f"  RSS +{(peak - rss0) >> 20} MiB", flush=True)

    for s in range(args.seed, args.seed + args.seeds):
        left = None if args.seconds is None else args.seconds - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            break
        rep = run_fuzz(per_seed, seed=s, limits=limits, time_limit=left, on_progress=progress)
        total.frames += rep.frames
        total.outcomes.update(rep.outcomes)
        total.failures += rep.failures
        total.max_frame_seconds = max(total.max_frame_seconds, rep.max_frame_seconds)
        peak = max(peak, proc.memory_info().rss)
    total.seconds = time.perf_counter() - t0

    if total.failures:
        args.crash_dir.mkdir(parents=True, exist_ok=True)
        for i, (frame_hex, tb) in enumerate(total.failures[:100]):
            (args.crash_dir / f"crash-{i:03d}.hex").write_text(frame_hex + "\n")
            (args.crash_dir / f"crash-{i:03d}.txt").write_text(tb)
    report = {
        "frames": total.frames,
        "seconds": round(total.seconds, 1),
        "frames_per_s": round(total.frames / max(total.seconds, 1e-9)),
        "failures": len(total.failures),
        "slowest_frame_ms": round(total.max_frame_seconds * 1e3, 2),
        "rss_growth_mib": (peak - rss0) >> 20,
        "tight_limits": args.tight,
        "outcomes": dict(total.outcomes.most_common()),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
