"""Which torch device a command runs on: one rule for training, evaluation and the benchmarks."""
from __future__ import annotations

from typing import Optional, Union

import torch


def pick_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """`device` when given (a name such as "cuda:1" or a torch.device), else CUDA when available, else CPU.

    "auto" means the same as None, so a command-line default of "auto" needs no special case.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
