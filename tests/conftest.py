import os
import random

import numpy as np
import pytest
import torch

# Tests share 2 cores: keep torch's intra-op pool small and deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
