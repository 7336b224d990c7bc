"""Shared test fixtures. (This file also makes the repository root importable for the tests in bench/:
pytest puts its folder on sys.path.)"""

import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent / "shared"


@pytest.fixture(scope="session")
def real_cifar100_subset(tmp_path_factory) -> Path:
    """The first 5,000 training and 1,000 test images of the real CIFAR-100, written in the official layout
    by the shared tool (read exactly as a user's download is); skipped where ../shared is absent."""
    tool = SHARED / "tools" / "cifar100_to_official_layout.py"
    if not tool.exists():
        pytest.skip("the real CIFAR-100 (../shared) is not beside this clone")
    root = tmp_path_factory.mktemp("real_cifar100")
    r = subprocess.run([sys.executable, str(tool), str(root), "--limit-train", "5000", "--limit-test", "1000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root
