"""Fresh random seeds for tests that draw new inputs every run."""

import os
import random

REPLAY = "FLASHMOE_TEST_SEED"  # set to a printed seed to replay a failure


def fresh_seed() -> int:
    """A seed drawn afresh each run, and printed: pytest shows a failed test's output, so a failure
    can be replayed with its seed (FLASHMOE_TEST_SEED=<seed> python -m pytest <the test's id>)."""
    seed = int(os.environ[REPLAY]) if os.environ.get(REPLAY) else random.SystemRandom().randrange(2**31)
    print(f"fresh_seed: {seed}")
    return seed
