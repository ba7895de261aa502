"""Scale on paper: what one round costs at 10,000 devices and for a 1B-parameter model, computed from figures
measured on this machine (the study's bytes and subspace seconds, the wire bench, the merge bench, the guide load
test at 1,000 clients).

    python bench/scale_paper.py --json docs/bench/scale.json

Nothing here is measured at that scale. Each output names the measured input it scales and the rule used:
  bytes down per client ∝ d: as the study sends them (θ fp32 + U q8 of k columns) and as the default wire does
  (U adaptive at 0.2, θ as the c-space move; docs/bench/wire_bytes.json); bytes up are per perturbation, not ∝ d
  the cloud's subspace build ∝ k × (forward + backward of the model) ∝ model parameters
  the c-space merge ∝ clients (k-dim replays) plus one d × k product ∝ d
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = {"params": 134.5e6, "layers": 30, "hidden": 576, "kv": 192}  # the study's model
LLAMA_1B = {"params": 1.24e9, "layers": 16, "hidden": 2048, "kv": 512}  # Llama-3.2-1B-class (GQA 32/8 heads)


def lora_qv_d(m: dict, rank: int = 8) -> int:
    """Trainable scalars of LoRA r on q and v of every layer (A: r × hidden, B: out × r)."""
    return m["layers"] * (rank * m["hidden"] + m["hidden"] * rank + rank * m["hidden"] + m["kv"] * rank)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    study = json.loads((REPO / "docs/bench/study/edgezo-s0.json").read_text())
    merge = json.loads((REPO / "docs/bench/merge_scale.json").read_text())
    load = json.loads((REPO / "docs/bench/guide_load_tls_1000.json").read_text())
    wire = json.loads((REPO / "docs/bench/wire_bytes.json").read_text())
    d_small = study["d"]
    if wire["d"] != d_small:
        raise SystemExit(f"the wire bench's d {wire['d']} is not the study's {d_small}")
    wire_down = wire["rows"]["adaptive_replay"]["down_bytes"]  # the default wire, per client per round
    rate = load["uploads_per_s_upload_phase"]  # uploads/s while uploads arrive (round 0's downlink aside)
    if d_small != lora_qv_d(SMOLLM2):  # the size rule must reproduce the measured d before it scales anything
        raise SystemExit(f"d rule gives {lora_qv_d(SMOLLM2)}, the study measured {d_small}")
    d_big = lora_qv_d(LLAMA_1B)
    down, up = study["bytes_per_round"]["down_per_client"], study["bytes_per_round"]["up_per_client"]
    sub_s = [r["cloud"]["subspace_seconds"] for r in study["log"] if r.get("cloud", {}).get("subspace_seconds")]
    sub_mean = sum(sub_s) / len(sub_s)
    per_client_merge = merge["rows"][-1]["cspace_merge_s"] / merge["rows"][-1]["clients"]
    n = a.devices
    out = {
        "inputs": {"d_smollm2": d_small, "down_bytes_per_client": down, "up_bytes_per_client": up,
                   "subspace_build_s_smollm2_2cores": sub_mean, "cspace_merge_s_per_client": per_client_merge,
                   "down_bytes_per_client_default_wire": wire_down,
                   "guide_uploads_per_s_tls_1000_upload_phase": rate},
        "smollm2_135m": {"devices": n, "down_GB_per_round": down * n / 1e9,
                         "down_GB_per_round_default_wire": wire_down * n / 1e9, "up_MB_per_round": up * n / 1e6,
                         "merge_s": per_client_merge * n, "subspace_build_s": sub_mean,
                         "upload_phase_s_at_measured_rate": n / rate},
        "llama_1b": {"d": d_big, "devices": n, "down_GB_per_round": down * d_big / d_small * n / 1e9,
                     "down_GB_per_round_default_wire": wire_down * d_big / d_small * n / 1e9,
                     "up_MB_per_round": up * n / 1e6, "merge_s": per_client_merge * n,
                     "subspace_build_s_2cores": sub_mean * LLAMA_1B["params"] / SMOLLM2["params"]},
    }
    for k in ("smollm2_135m", "llama_1b"):
        print(k, {x: round(v, 2) if isinstance(v, float) else v for x, v in out[k].items()})
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
