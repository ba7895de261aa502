"""Conversion benchmark: a thin wrapper around ``edgezo bench convert`` (app/benches/convert.py).

    python bench/convert.py --json bench-convert.json [--hf HF_FOLDER] [--types f32 q4_k_m]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is called convert.py: running it puts bench/ first on sys.path, where "convert" would resolve to
# this script instead of the package. Drop that entry so ``import convert`` finds the real one.
_HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from app.benches.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
