"""``edgezo bench``: the five subcommands parse, refuse bad values in one line (exit 2), and the cheap benches run
end to end (compression on small vectors; guide-load with 3 clients against the real daemon over TLS)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from app.cli import main

BENCHES = ("forward", "step", "compression", "guide-load", "convert")


def _exit_code(argv: list[str]) -> int:
    """``app.cli.main`` run to completion: its return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_bench_help_lists_all_five(capsys):
    assert _exit_code(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in BENCHES:
        assert name in out


def test_bench_alone_prints_help_and_returns_2(capsys):
    assert main(["bench"]) == 2
    assert "guide-load" in capsys.readouterr().out


def test_the_parser_imports_neither_torch_nor_psutil():
    """``edgezo --help`` and ``edgezo bench compression`` must work on an edge install (no torch, no psutil)."""
    code = ("import sys; from app.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'psutil', 'transformers', 'cloud.tls') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize(("argv", "message"), [
    (["compression", "--d", "10"], "argument --d: must be >= 200,000, got 10"),
    (["compression", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["guide-load", "--clients", "0"], "argument --clients: must be in [1, 5,000], got 0"),
    (["guide-load", "--rounds", "101"], "argument --rounds: must be in [1, 100], got 101"),
    (["guide-load", "--dims", "1,2"], "argument --dims: want five positive integers"),
    (["guide-load", "--timeout", "0"], "argument --timeout: must be > 0"),
    (["guide-load", "--spread", "-1"], "argument --spread: must be a finite number >= 0"),
    (["convert", "--types", "f32"], "the following arguments are required: --json"),
    (["convert", "--json", "out.json", "--types", "f32", "q9"], "argument --types: invalid choice: 'q9'"),
])
def test_a_bad_value_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"edgezo bench {argv[0]}: error: {message}")
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_convert_help_parses_and_a_missing_hf_folder_is_refused(capsys, tmp_path):
    assert _exit_code(["bench", "convert", "--help"]) == 0
    assert "--types" in capsys.readouterr().out
    out = tmp_path / "c.json"
    assert main(["bench", "convert", "--json", str(out), "--hf", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"edgezo: error: --hf {tmp_path / 'nope'} is not a folder"
    assert not out.exists()


def test_guide_load_without_psutil_says_so_in_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ModuleNotFoundError
    assert main(["bench", "guide-load", "--clients", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs psutil" in err[0] and "pip install psutil" in err[0]


def test_compression_writes_json_with_the_scripts_keys(tmp_path):
    out = tmp_path / "sub" / "comp.json"
    assert main(["bench", "compression", "--d", "200000", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"d", "repeats", "machine", "inputs", "checks"}
    assert res["d"] == 200_000 and res["machine"]["threads"] == 1
    assert set(res["inputs"]) == {"grad_student_t4", "grad_student_t3", "gaussian", "basis_Q_k4"}
    for name, x in res["inputs"].items():
        q8 = x["codecs"]["q8"]
        assert {"wire_bytes", "ratio_vs_fp32", "rel_l2_error", "cosine", "encode_decode_MBps"} <= set(q8)
        assert q8["cosine"] >= 0.9999, name
        assert res["checks"][f"{name}: q8 cosine >= 0.9999"] is True
    assert "orthonormality_error" in res["inputs"]["basis_Q_k4"]["codecs"]["q4"]


def test_guide_load_acks_every_upload_over_tls(tmp_path):
    pytest.importorskip("psutil")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed for the self-signed TLS pair")
    out = tmp_path / "load.json"
    # In a child so a hung daemon or client fails the test at the timeout instead of blocking the run.
    r = subprocess.run([sys.executable, "-m", "app", "bench", "guide-load", "--clients", "3", "--rounds", "1",
                        "--steps", "2", "--timeout", "60", "--spread", "0.5", "--json", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["tls"] is True and res["uploads_acked"] == 3 and res["client_errors"] == 0 and res["spread_s"] == 0.5
    assert res["rounds_closed"][0]["uploads"] == 3 and res["d"] == 460_800 and res["daemon_exit"] == 0


def test_round_barrier_holds_uploads_until_every_running_client_has_the_round():
    """Uploads of round r wait for every client still running; a client that ends stops being waited for."""
    import asyncio

    from app.benches.guide_load import RoundBarrier

    async def go() -> list[str]:
        b, seen = RoundBarrier(3), []

        async def client(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            await b.wait(0, timeout=5)
            seen.append(name)

        async def quitter() -> None:
            await asyncio.sleep(0.1)
            b.leave()  # fails before round 0: the other two must not wait for it

        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(client("a", 0.0), client("b", 0.05), quitter())
        assert asyncio.get_running_loop().time() - t0 >= 0.09  # a and b were held until the third one left
        return seen

    assert sorted(asyncio.run(go())) == ["a", "b"]
