import os

import pytest
import torch

# Tests share two cores with everything else: one torch thread keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("CMVAE_TEST_THREADS", "1")))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
