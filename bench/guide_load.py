"""Load test of the guide daemon: a thin wrapper around ``edgezo bench guide-load`` (app/benches/guide_load.py).

    python bench/guide_load.py --clients 500 --rounds 3 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.benches.guide_load import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
