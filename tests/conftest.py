"""Every test runs offline: no model hub, no dataset hub (this workplace has neither)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# Triton reads TRITON_INTERPRET when it is first imported (torchao's fp8 tests import it too), so the fused
# kernels' CPU tests (tests/test_fused_kernels.py) need it set before any test runs; CI has no GPU.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
