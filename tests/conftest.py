import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("SPA_STRICT_RULES", "1")  # a rule that crashes fails the test instead of freezing

import zoo  # noqa: E402


def zoo_dir() -> Path:
    """Exports are cached across runs; the key changes when the zoo or torch does."""
    import torch

    default = Path.home() / ".cache" / "spa" / f"zoo-{zoo.ZOO_VERSION}-torch{torch.__version__.split('+')[0]}"
    return Path(os.environ.get("SPA_ZOO_DIR", default))


@pytest.fixture(scope="session")
def zoo_model():
    def get(name: str, exporter: str) -> Path:
        return zoo.export(name, exporter, zoo_dir())

    return get
