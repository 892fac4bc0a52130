"""One seed drives everything. Each (purpose, round, client) gets its own stream derived with NumPy's
SeedSequence, so results do not depend on which actor ran which client, or in what order."""

from __future__ import annotations

import numpy as np
import torch

# stream purposes (any distinct integers)
INIT, TRAIN, SAMPLE, EVAL, FAULT, SERVER, PRIVACY = 1, 2, 3, 4, 5, 6, 7
SERVER_SET = 8  # which long-tailed training images the server-held set takes (server_data.per_class)
LABEL_NOISE = 0x6E6F6973  # which training labels dataset.label_noise flips ("nois")
# A strategy's own streams are declared in its file (e.g. CReFF 1001, CCVR and Ratio Loss 1014): only one strategy
# runs in a run, so they need only be distinct from the purposes above and from each other within that file.


def derive_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(1, dtype=np.uint64)[0]
               % (2**63 - 1))


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(k) for k in keys]]))
