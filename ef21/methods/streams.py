"""Where every random draw comes from: a generator keyed by (seed, rank, round) and a stream tag.

Each purpose has its own tag, so draws of different purposes are independent, and each key is a pure function of
the run's seed and position, so a run replays exactly, master and workers draw the same shared coins without a
message, and a replacement worker continues its predecessor's stream.
"""

from __future__ import annotations

import numpy as np

# The compressor's generator is default_rng([seed, rank, round]); these tags extend the key.
BATCH_STREAM = 1
PAGE_COIN_STREAM = 2
PARTICIPATION_STREAM = 3
DOWNLINK_STREAM = 4
# 5: a PyTorch objective's own draws (dropout, augmentation), keyed by (seed, rank, round) in ef21.problems.torch.
MARINA_COIN_STREAM = 6


def round_rng(seed: int, rank: int, round_: int) -> np.random.Generator:
    """The compressor's generator of one worker in one round."""
    return np.random.default_rng([seed, rank, round_])
