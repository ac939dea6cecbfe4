"""Make the top-level modules (tmpo.py, tree_sampler.py, ...) importable from the tests."""

import os
import sys

# Every test builds its models offline; a hub lookup would only burn minutes in retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
