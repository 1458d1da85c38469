import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import async_online_dpo as A  # noqa: E402

# Small but real: the built-in model with a short warm start, shared by every test in the session.
SFT_STEPS = 30


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    A.warm_start(A.Args(cache_dir=str(path), sft_steps=SFT_STEPS))
    return str(path)


@pytest.fixture(scope="session")
def model_path(cache_dir):
    return A.warm_start(A.Args(cache_dir=cache_dir, sft_steps=SFT_STEPS))
