"""Downlink compression benchmark: a thin wrapper around ``edgezo bench compression`` (app/benches/compression.py).

    python bench/compression.py --json bench-compression.json [--d 460800] [--repeats 5]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads
    os.environ.setdefault(_v, "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.benches.compression import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
