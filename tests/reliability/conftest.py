"""The standing reliability suite: fuzzed adapter files, server abuse, kills, merge cycles.

Every test here is marked `reliability` (select with -m reliability); they run in CI with the rest.
The tiny-model builders live one folder up.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.reliability)
