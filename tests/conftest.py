import os
import random

# OpenMP threads spin-wait between parallel regions by default. On 2 cores shared with anything else (another
# test's subprocess, another job) a spinning thread holds a core the work needs, and tiny ops then take 10-200x
# longer (measured here: 100 small conv2d calls at 2 threads 16 ms on quiet cores, 90-3200 ms with background load;
# 25 ms with passive waiting; 21 ms on one thread). Passive waiting must be chosen before libgomp loads (with
# torch); subprocesses the tests start (the scripts, as users run them) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Without a GPU, Triton kernels run through Triton's interpreter. It must be chosen before Triton is first
# imported (importing timm or atc does that), so here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One intra-op thread: the tests' models are tiny (per-op work too small to split), results do not depend on the
# machine's core count, and no OpenMP pool competes with the subprocesses some tests start.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
