"""Shared test settings."""

import torch

# Small tensors: one intra-op thread per pytest worker is several times faster than
# torch's default on a busy 2-core machine (pytest -n 2 runs two workers).
torch.set_num_threads(1)
