"""run_contrastive.py as one process of several, reporting what it computed and failing a save when asked.

    RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... ACCELERATE_USE_CPU=true \\
        python tests/several_processes_driver.py <run_contrastive.py options>

For tests of what several processes do (tests/test_several_processes.py), with the script unchanged:
`REPORT_DIR` receives `computed-<rank>.txt` (each disk cache this process computed, by file name) and
`features-<rank>.txt` (each disk cache it holds, with a hash of its tensors); `FAIL_SAVE_AT=k` makes process 0's
k-th `accelerator.save_state` fail as a full disk does.
"""

import errno
import hashlib
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

REPO = Path(__file__).resolve().parent.parent


def note(kind: str, line: str) -> None:
    with open(Path(os.environ["REPORT_DIR"]) / f"{kind}-{os.environ['RANK']}.txt", "a") as handle:
        handle.write(line + "\n")


def digest(features: dict) -> str:
    hashed = hashlib.sha1()
    for key in sorted(features):
        hashed.update(str(key).encode() + features[key].to(torch.float32).numpy().tobytes())
    return hashed.hexdigest()


def reporting(load_or_compute):
    def load_or_compute_noted(path, compute):
        def computed():
            note("computed", os.path.basename(path))
            return compute()
        features = load_or_compute(path, computed)
        note("features", f"{os.path.basename(path)} {digest(features)}")
        return features
    return load_or_compute_noted


def failing_at(call: int, save_state):
    calls = []

    def save_state_or_fail(self, *args, **kwargs):
        calls.append(1)
        if self.is_main_process and len(calls) == call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, *args, **kwargs)
    return save_state_or_fail


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from dualencoder.training import feature_cache

    feature_cache.load_or_compute = reporting(feature_cache.load_or_compute)
    if os.environ.get("FAIL_SAVE_AT"):
        Accelerator.save_state = failing_at(int(os.environ["FAIL_SAVE_AT"]), Accelerator.save_state)
    import run_contrastive

    run_contrastive.main(sys.argv[1:])
