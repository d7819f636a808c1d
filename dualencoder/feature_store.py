"""Cached features on disk: one format and one key scheme for every cache of the project.

A cache file is `<cache_dir>/<kind>-<key>.pt` (`feature_file`): a mapping of tensors (image id or
caption -> features, or a whole split's arrays) written with `torch.save`, temp-then-rename, and read
back with `weights_only=True` (`load_or_compute`); a damaged file is computed again, not fatal. The key
is a short hash of whatever the features depend on: the tower's weights (`tower_fingerprint`) and the
preprocessing and images for the training caches (`dualencoder.training.feature_cache`), the data and
backbone names for the baselines' frozen features (`dualencoder.baselines.features`), which must be found
without loading a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)


def feature_file(cache_dir, kind: str, key: str) -> Optional[Path]:
    """Where the `kind` features of `key` are kept (None when there is no cache directory)."""
    if not cache_dir:
        return None
    return Path(os.path.expanduser(str(cache_dir))) / f"{kind}-{key}.pt"


def tower_fingerprint(module: torch.nn.Module, *extra, without_adapters: bool = False) -> str:
    """A short hash of a tower's weights (and any extra settings, e.g. the input size).

    Cached features are only valid for exactly these weights and preprocessing; the hash makes
    a stale cache impossible to pick up. `without_adapters` hashes the pretrained weights under
    their plain names, leaving out LoRA adapters: right for a prefix cache, whose frozen blocks
    hold no adapters (see `frozen_prefix_depth`), so a run with adapters in the top blocks reuses
    the prefix that a run without them cached.
    """
    digest = hashlib.sha1(repr(extra).encode())
    for name, tensor in sorted(_named_weights(module, without_adapters)):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _named_weights(module: torch.nn.Module, without_adapters: bool):
    for name, tensor in module.state_dict().items():
        if without_adapters:
            if "lora_" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, tensor


def load_or_compute(path, compute: Callable[[], dict]) -> dict:
    """A feature dict from `path` if it exists, else `compute()` saved there (atomically)."""
    if path and os.path.isfile(path):
        try:
            features = torch.load(path, weights_only=True)
            logger.info("reusing cached features from %s", path)
            return features
        except (RuntimeError, EOFError, OSError) as error:  # a truncated or damaged file is rebuilt, not fatal
            logger.warning("cached features in %s are unreadable (%s): computing them again.", path, error)
    features = compute()
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # one per process: several may write the same cache at once
        torch.save(features, tmp)
        os.replace(tmp, path)
    return features
