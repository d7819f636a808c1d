"""Checks before any work: can the run write where it will save, and does the disk hold what it will save?

A run that learns at its first checkpoint, hours in, that `output_dir` is a file, unwritable or on a full disk
loses those hours (and used to end in a traceback). Both are known before training: the folder is probed with a
real write, and the bytes the run will hold at once are estimated from the model's parameter counts.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

ADAM_STATES = 2  # AdamW keeps two tensors the size of each trained one (exp_avg, exp_avg_sq)
CHECKPOINT_EXTRA = 1_000_000  # bytes: random states, the loop state (its log grows), file headers
EXPORT_EXTRA = 5_000_000  # bytes: the tokenizer's files, the modeling files, the card and the logs


def check_writable(output_dir: str) -> None:
    """Create `output_dir` if needed and write a probe file in it; one error line naming the path otherwise."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SystemExit(f"error: --output_dir {output_dir} is a file, not a folder; pass another --output_dir.")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise SystemExit(f"error: --output_dir {output_dir} is not writable ({error.strerror or error}); fix its "
                         "permissions or pass another --output_dir.") from None


def bytes_needed(model: torch.nn.Module, checkpoints_kept: int) -> dict:
    """What the run holds on disk at its fullest: `checkpoints_kept` checkpoints plus the one being written (the
    trained weights, their optimiser states, the buffers), the best model while its new copy is written (two full
    models), and the export (one more, with its processor and card)."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    full = sum(p.numel() * p.element_size() for p in model.parameters()) + buffers + EXPORT_EXTRA
    checkpoint = trained * (1 + ADAM_STATES) + buffers + CHECKPOINT_EXTRA
    return {"checkpoint": checkpoint, "checkpoints": checkpoints_kept + 1, "model": full,
            "total": (checkpoints_kept + 1) * checkpoint + 3 * full}


def gigabytes(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def check_free_space(output_dir: str, model: torch.nn.Module, checkpoints_kept: int) -> None:
    """One error line naming the path, the free space and the estimate when the disk cannot hold the run."""
    need = bytes_needed(model, checkpoints_kept)
    free = shutil.disk_usage(output_dir).free
    if free < need["total"]:
        raise SystemExit(
            f"error: --output_dir {output_dir} has {gigabytes(free)} free, the run needs about "
            f"{gigabytes(need['total'])} ({need['checkpoints']} checkpoints of {gigabytes(need['checkpoint'])}, the "
            f"best model twice and the export, {gigabytes(need['model'])} each); free space, lower "
            "--save_total_limit or pass another --output_dir.")
