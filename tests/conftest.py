"""Fresh random inputs every run: the seed changes per run and is printed, POSENC_TEST_SEED=N replays one."""
import os
import random

import pytest
import torch

SEED = int(os.environ.get("POSENC_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"posenc test seed: {SEED} (replay with POSENC_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)
    random.seed(SEED)
    yield
