import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def market_dir(tmp_path):
    from market import write_refdata

    write_refdata(tmp_path)
    return tmp_path
