"""Makes tests/ops/bsr_testing.py importable from every test folder."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ops"))

# `from tests.<folder> import ...` needs the repository root on sys.path. It
# goes last, so that with PYTHONSAFEPATH=1 (the README's test command) the
# installed tf_blocksparse still comes before the source tree's copy.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.append(_ROOT)
