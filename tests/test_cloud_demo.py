"""``edgezo demo`` end to end on the real SmolLM2-135M (quick settings): guide + two llama.cpp edges."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_quick_runs_and_writes_plot(tmp_path, smollm2_gguf):
    # Prepare
    from app.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(rounds=1, local_steps=1, test_n=16, val_n=8)
    # Execute
    summary = run_demo(cfg, out=tmp_path / "out", log=lambda *a: None, cache=tmp_path / "cache")
    tmp_path = tmp_path / "out"
    # Assert
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [c["round"] for c in saved["curve"]] == [0, 1]
    assert saved["rounds"][0]["uploads"] == 2
    assert 0.0 <= summary["after"]["acc"] <= 1.0 and summary["after"]["forward_passes"] == 2 * 2 * cfg.local_steps
    # the three figures a user reads: zero-shot, cloud only and edgezo on the same private test texts
    for key in ("zero_shot", "cloud_only", "after"):
        assert 0.0 <= saved[key]["acc_calibrated"] <= 1.0
    assert saved["rounds"][0]["round"] == 0 and "public_loss" in saved["rounds"][0]
