"""The edge install has no torch: the CLI and every edge module must work with torch/transformers absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a child process: make torch, transformers and peft unimportable, then use the edge side.
BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'peft', 'accelerate'}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
import edge.adapter, edge.client, edge.commands, edge.data, edge.runtime, edge.tasks, edge.train, edge.zo
import protocol, convert.lora_gguf
from app.cli import build_parser, main
parser = build_parser()
assert {'train', 'eval', 'convert', 'guide', 'demo'} <= set(parser._subparsers._group_actions[0].choices)
print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers'}))
"""


def test_edge_modules_and_cli_work_without_torch() -> None:
    # Execute
    out = subprocess.run([sys.executable, "-c", BLOCKED], cwd=REPO, capture_output=True, text=True, timeout=120)
    # Assert
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout


def test_cloud_command_without_torch_names_the_missing_extra() -> None:
    # Prepare
    prelude = BLOCKED.split("from app.cli")[0] + "from app.cli import main\n"
    # Execute
    help_out = subprocess.run(
        [sys.executable, "-c", prelude + "sys.exit(main(['guide', 'status', '--help']))"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    demo = subprocess.run(
        [sys.executable, "-c", prelude + "sys.exit(main(['demo', '--quick', '--out', '/nonexistent/x']))"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    # Assert
    assert help_out.returncode == 0, help_out.stderr[-2000:]  # --help never needs torch
    assert demo.returncode == 2
    assert "edgezo[cloud]" in demo.stderr and "torch" in demo.stderr
