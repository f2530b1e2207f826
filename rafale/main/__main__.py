"""`python rafale/main -c cfg.yaml` from the repo root: the same as `rafale train -c cfg.yaml`."""

import sys
from pathlib import Path

# Run as a directory, Python puts rafale/main/ on sys.path; the package lives two levels up.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rafale.cli import entry  # noqa: E402

entry()
