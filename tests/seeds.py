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


def same_seed() -> int:
    """A seed drawn afresh on rank 0 and broadcast (torch.distributed, through the current GPU): the
    one every rank of a GPU check draws its layer and inputs from."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([random.SystemRandom().randrange(2**31)], device="cuda")
    dist.broadcast(t, 0)
    return int(t)
