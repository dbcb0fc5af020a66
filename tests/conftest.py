import os
import random

import torch

# Without a GPU, Triton kernels run through Triton's interpreter. It must be chosen before Triton is first
# imported (importing timm or atc does that), so here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tests share 2 cores: keep torch's intra-op pool small and deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
