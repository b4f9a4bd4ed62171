"""Test-wide settings: tiny tensors run fastest on one thread, and several test processes may share
the machine's two cores (OpenMP threads spinning against each other cost far more than they gain)."""

import torch

torch.set_num_threads(1)
