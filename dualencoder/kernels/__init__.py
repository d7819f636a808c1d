"""Speed levers that change how a model runs, never what it computes (up to rounding) or its weights' names:
fused Triton kernels (`fuse.py`, kernels in `triton_fused.py`) and fp8 matmuls through torchao (`fp8.py`).
Each module imports its optional dependency only when its lever is used."""
