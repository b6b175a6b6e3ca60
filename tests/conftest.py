"""Test settings shared by every test (the helper models live in tiny_models.py)."""

import torch

# Tiny tensors: one thread is faster, and far faster on a busy 2-core machine where
# intra-op threads fight other processes.
torch.set_num_threads(1)
