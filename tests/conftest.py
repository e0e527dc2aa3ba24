import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread per xdist worker (the suite runs with -n 2 on 2 cores), else up to 2
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(params=["bert", "gpt2", "llama", "t5"])
def arch(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a real model (a minute or more); deselect with -m 'not slow'")
