"""Webb's brain: cluster model, pure reconcile, sources, node runtime, agent, CLI."""

import sys
from pathlib import Path

# Our ``xds`` package shares its name with the CNCF protos of ``xds-protos`` (see
# xds/__init__.py); the repository root must precede site-packages for ours to win.
_ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [_ROOT] and "xds" not in sys.modules:
    sys.path.insert(0, _ROOT)
