"""The study report's arithmetic (bench/convergence_report.py) on hand-made records: budgets, mean ± sd,
targets, and a report that regenerates byte for byte from the same JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("convergence_report",
                                               Path(__file__).resolve().parents[1] / "bench" / "convergence_report.py")
rep = importlib.util.module_from_spec(_SPEC)
sys.modules["convergence_report"] = rep
_SPEC.loader.exec_module(rep)


def _zo(arm: str, seed: int, accs: list[float]) -> dict:
    return {"arm": arm, "seed": seed, "train_s": 10.0 * seed,
            "curve": [{"round": i, "forward_passes": fp, "train_s": float(i), "acc": a, "acc_calibrated": a + 0.01}
                      for i, (fp, a) in enumerate(zip((0, 600, 2000), accs, strict=True))]}


def _torch(arm: str, seed: int, acc: float) -> dict:
    return {"arm": arm, "seed": seed, "train_s": 5.0,
            "curve": [{"steps": 0, "acc": 0.7, "acc_calibrated": 0.71}, {"steps": 40, "acc": acc, "acc_calibrated": acc}]}


def _write(tmp: Path, recs: list[dict]) -> Path:
    for r in recs:
        (tmp / f"{r['arm']}-s{r['seed']}.json").write_text(json.dumps(r))
    (tmp / "config.json").write_text(json.dumps({"clients": 4, "k": 16}))
    return tmp


def test_budgets_means_and_targets(tmp_path):
    runs = _write(tmp_path, [_zo("edgezo", 0, [0.7, 0.8, 0.90]), _zo("edgezo", 1, [0.7, 0.82, 0.92]),
                             _zo("mezo", 0, [0.7, 0.72, 0.75]), _zo("mezo_warm", 0, [0.8, 0.81, 0.86]),
                             _torch("cloud_only", 0, 0.86), _torch("backprop", 0, 0.93)])
    recs, _, _ = rep.load(runs)
    s = rep.summary(recs)
    m, sd, n = s["edgezo"]["acc_calibrated@2000"]
    assert n == 2 and m == pytest.approx(0.92) and sd == pytest.approx(0.01414, abs=1e-4)
    assert s["edgezo"]["acc@600"][0] == pytest.approx(0.81)
    assert rep.reach(recs["edgezo"][0], 0.76, "acc_calibrated") == 600
    lines = "\n".join(rep.targets(s, recs))
    assert "(d) ≥ (f) + 3 points" in lines and "92.0 vs 86.0 + 3 = 89.0 (+6.0) | met" in lines
    assert "within 2 points of (g)" in lines and "(-1.0) | met" in lines
    assert "(b) + 2 points" in lines and "92.0 vs 87.0 (+5.0) | met" in lines
    # mezo ends at 76 (calibrated); edgezo reaches it after 600 forwards: 2,000 / 600 < 10×, missed
    assert "reaches (a)'s final accuracy" in lines and "[600, 600]" in lines and "**missed**" in lines


def test_report_regenerates_unchanged_from_the_same_json(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    _write(runs, [_zo("edgezo", 0, [0.7, 0.8, 0.9]), _torch("cloud_only", 0, 0.85)])
    out = tmp_path / "docs"
    out.mkdir()
    assert rep.main(["--runs", str(runs), "--out", str(out)]) == 0
    first = (out / "RESULTS.md").read_text()
    assert rep.main(["--runs", str(runs), "--out", str(out)]) == 0
    assert (out / "RESULTS.md").read_text() == first
    assert "(d) edgezo round v2" in first and (out / "results_acc_calibrated_forwards.png").stat().st_size > 1000


def test_report_without_records_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rep.main(["--runs", str(tmp_path), "--out", str(tmp_path)])
    assert e.value.code == 2 and "no study records" in capsys.readouterr().err


def test_a_named_variant_is_an_arm_with_its_own_targets_and_others_are_left_out(tmp_path):
    runs = _write(tmp_path, [_zo("edgezo", 0, [0.7, 0.8, 0.85]), _zo("mezo_warm", 0, [0.8, 0.81, 0.86]),
                             _torch("cloud_only", 0, 0.86), _torch("backprop", 0, 0.93)])
    (runs / "variants").mkdir()
    for tag, accs in (("sw3", [0.7, 0.8, 0.9]), ("cos", [0.7, 0.5, 0.5])):
        (runs / "variants" / f"edgezo-{tag}-s0.json").write_text(json.dumps(_zo("edgezo", 0, accs)))
    recs, _, _ = rep.load(runs)
    assert sorted(recs) == ["backprop", "cloud_only", "edgezo", "edgezo-sw3", "mezo_warm"]
    s = rep.summary(recs)
    assert s["edgezo-sw3"]["acc_calibrated@2000"][0] == pytest.approx(0.91)
    lines = "\n".join(rep.targets(s, recs, 2000, "edgezo-sw3"))
    assert "(d′) ≥ (b) + 2 points (at 2,000) | 91.0 vs 87.0 (+4.0) | met" in lines
