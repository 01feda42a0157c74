"""Fresh random seeds for tests that draw new inputs every run."""

import random


def fresh_seed() -> int:
    """A seed drawn afresh each run, and printed: pytest shows a failed test's output, so a failure
    can be replayed with its seed."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"fresh_seed: {seed}")
    return seed
