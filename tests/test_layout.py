"""The package contract (DESIGN.md's table): roles import only downward, and each role's heavy dependencies stay
out of the others. Every ``import`` in the source counts, including the lazy ones inside functions.

    app/       may import everything (the CLI, the demo: the roles put together in one process)
    edge/      protocol, convert (GGUF helpers); never torch
    cloud/     protocol, convert; never llama_cpp
    convert/   protocol
    protocol/  nothing of ours; never flwr (Flower's records carry protocol frames, protocol knows no Flower)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROLES = ("app", "edge", "cloud", "convert", "protocol")
ALLOWED: dict[str, set[str]] = {
    "app": {"edge", "cloud", "convert", "protocol"},
    "edge": {"protocol", "convert"},
    "cloud": {"protocol", "convert"},
    "convert": {"protocol"},
    "protocol": set(),
}
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {"edge": {"torch", "transformers", "peft"}, "cloud": {"llama_cpp"},
                                              "protocol": {"torch", "llama_cpp", "flwr"}}


def imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def violations(role: str, source: str, where: str = "<source>") -> list[str]:
    """The imports in ``source`` (a module of ``role``) that the contract forbids."""
    bad = []
    for line, top in imports(source):
        if top in ROLES and top != role and top not in ALLOWED[role]:
            bad.append(f"{where}:{line}: {role} imports {top}")
        if top in FORBIDDEN_THIRD_PARTY.get(role, set()):
            bad.append(f"{where}:{line}: {role} imports {top}")
    return bad


def test_roles_import_only_downward():
    found = []
    for role in ROLES:
        for f in sorted((REPO / role).rglob("*.py")):
            found += violations(role, f.read_text(), str(f.relative_to(REPO)))
    assert found == []


@pytest.mark.parametrize(("role", "line", "bad"), [
    ("edge", "from cloud.daemon import GuideServer", True),
    ("cloud", "def f():\n    from edge.client import parse_addr\n", True),  # lazy imports count
    ("convert", "import edge.runtime", True),
    ("protocol", "import convert", True),
    ("cloud", "import llama_cpp", True),
    ("edge", "import torch", True),
    ("protocol", "from flwr.app import ConfigRecord", True),  # Flower's records are the transport's, not the wire's
    ("app", "from edge.client import EdgeClient\nfrom cloud.daemon import serve", False),
    ("edge", "from convert.tail import write_tail_gguf\nfrom protocol.zo import Guide", False),
])
def test_the_contract_check_catches_a_forbidden_import(role, line, bad):
    assert bool(violations(role, line)) is bad
