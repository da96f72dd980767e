"""Fresh random inputs every run: the seed changes per run and is printed, POSENC_TEST_SEED=N replays one."""
import os
import random

import pytest
import torch

SEED = int(os.environ.get("POSENC_TEST_SEED", random.SystemRandom().randrange(2**31)))


def _seed_line():
    return f"posenc test seed: {SEED} (replay with POSENC_TEST_SEED={SEED})"


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    # `pytest -q` (the README's and CI's command) hides the header; the summary shows even then, next to
    # the failures the seed replays.
    if terminalreporter.config.get_verbosity() < 0:
        terminalreporter.write_line(_seed_line())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)
    random.seed(SEED)
    yield
