import sys
from pathlib import Path

import pytest

# The dense reference implementations and the distributed worker live next to the tests as
# plain modules (unique names, so they cannot clash with other packages' test helpers).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Shrink the row-chunk budget so that tiny tensors are split into many chunks."""
    import align_losses._common as common

    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 24)
    return 24
