"""The convergence study's pure helpers: CLI parsing of λ, pilot keys per variant, evaluation points."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("bench_convergence",
                                               Path(__file__).resolve().parents[1] / "bench" / "convergence.py")
conv = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_convergence"] = conv  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(conv)


def test_lam_arg_accepts_numbers_and_online_and_names_bad_input():
    assert conv.lam_arg("0.25") == 0.25
    assert conv.lam_arg("online") == "online"
    with pytest.raises(argparse.ArgumentTypeError, match="in \\[0, 1\\]"):
        conv.lam_arg("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match="'sometimes'"):
        conv.lam_arg("sometimes")


def test_pilot_keys_differ_per_variant_so_runs_never_overwrite_each_other():
    # Prepare: the default config and three variants of it
    base = conv.StudyConfig()
    online = dataclasses.replace(base, lam="online")
    tau4 = dataclasses.replace(base, local_steps=4)
    # Execute
    keys = {conv.variant_suffix("edgezo", c) for c in (base, online, tau4)}
    # Assert: three distinct keys; MeZO (one device, no guidance) ignores both settings
    assert len(keys) == 3
    assert "+lam=online" in conv.variant_suffix("edgezo", online)
    assert conv.variant_suffix("fedkseed", tau4) == "+tau=4"
    assert conv.variant_suffix("mezo", tau4) == conv.variant_suffix("mezo", online) == ""


def test_eval_points_cover_the_early_marks_and_the_end():
    # MeZO: 2 forwards a step, budget 300 -> 150 steps; the early marks are steps 5, 10, 15, 25, 50
    pts = conv.eval_points(300, 2, 150)
    assert {0, 5, 10, 15, 25, 50, 150} <= set(pts) and max(pts) == 150
    # federated, 4 clients x 4 local steps x 2 forwards = 32 forwards a round: 9 rounds, every mark still lands
    pts = conv.eval_points(300, 32, 9)
    assert pts[0] == 0 and pts[-1] == 9 and all(1 <= p <= 9 for p in pts[1:])
