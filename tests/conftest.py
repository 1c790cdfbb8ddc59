import os

import pytest
import torch

# Tests share two cores with everything else: one torch thread keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("CMVAE_TEST_THREADS", "1")))

# Without a GPU the Triton kernels run only in Triton's interpreter, which Triton selects when the @triton.jit
# definitions execute (at `import kernels`, during collection): so the variable is set here, before any test
# module is imported, rather than in the kernel tests. It is harmless to the rest of the suite: the default
# kernel backend stays `auto` (C++ extension or torch on CPU), inductor emits C++ rather than Triton on CPU, and
# on this machine neither `import kernels` (4.5 s either way) nor tests/test_objectives.py (8.9 s with it,
# 9.8 s without) got slower.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
