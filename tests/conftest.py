import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

torch.set_num_threads(1)  # tiny shapes: one thread is fastest and steadiest on a shared machine


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared tiny corpus shared by every test of the session."""
    return tmp_path_factory.mktemp("data")
