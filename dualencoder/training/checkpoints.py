"""Resumable checkpoints that a crash can never leave half-written where resume would find them.

A checkpoint is written to `checkpoint-<step>.tmp` and renamed to `checkpoint-<step>` only when
complete (the rename is atomic); resume considers only directories holding `trainer_state.json`,
which is written last. The same write-then-rename protects the best model's directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Callable, Optional

from dualencoder.training.arguments import all_options

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def earlier_checkpoints(output_dir: str, resume: Optional[str], overwrite: bool) -> list[str]:
    """The checkpoints of an earlier run in `output_dir` that a new run must delete first (`overwrite`).

    A new run (no `resume`) in a folder holding checkpoints is refused: checkpoint rotation deletes the
    lowest step numbers, which would be the new run's own, and `--resume_from_checkpoint latest` after a
    crash would continue the old run.
    """
    existing = list_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if not existing or resume:
        return []
    if overwrite:
        return existing
    names = ", ".join(os.path.basename(path) for path in existing)
    raise SystemExit(f"error: {output_dir} already holds checkpoints of an earlier run ({names}). Continue that run "
                     "with --resume_from_checkpoint latest, start over with --overwrite_output_dir true (deletes "
                     "them), or pass another --output_dir.")


def resolve_resume(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """`latest` -> the newest complete checkpoint (or None to start fresh, said in the log), a path -> itself,
    checked."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, so this is a new run.",
                           output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise SystemExit(f"error: {resume} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-<step> directory or 'latest'")
    return resume


def _swap_in(tmp_dir: str, final_dir: str) -> None:
    old_dir = final_dir + ".old"
    recover_swap(final_dir)
    if os.path.exists(final_dir):
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)  # a crash between the two renames leaves only `.old`: recover_swap puts it back
    shutil.rmtree(old_dir, ignore_errors=True)


def recover_swap(final_dir: str) -> None:
    """Undo a swap that a crash cut in half: `final_dir` gone, its previous version at `final_dir.old`."""
    old_dir = final_dir + ".old"
    if not os.path.exists(final_dir) and os.path.isdir(old_dir):
        os.replace(old_dir, final_dir)


def move_into(staging: str, out: str, last: str) -> None:
    """Move everything `staging` holds into `out` (replacing what is there), `last` after all the rest.

    Each file moves by one rename, and `last` (e.g. metrics.json) goes in only when the rest is in
    place, so its presence says the export is complete. `staging` is removed.
    """
    names = sorted(os.listdir(staging), key=lambda name: name == last)
    for name in names:
        target = os.path.join(out, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def write_atomically(final_dir: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_dir)`, then swap `tmp_dir` in place of `final_dir` (one process only)."""
    tmp_dir = final_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    write(tmp_dir)
    _swap_in(tmp_dir, final_dir)


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, keep: int) -> str:
    """accelerator.save_state (model, optimiser, scheduler, every process's RNG) + our loop state.

    Every process takes part (each writes its own RNG state); the main process alone writes the
    state file last and renames the finished directory into place.
    """
    final_dir = os.path.join(output_dir, f"checkpoint-{step}")
    tmp_dir = final_dir + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp_dir, STATE_FILE), "w") as handle:
            json.dump(state, handle, indent=2)
        _swap_in(tmp_dir, final_dir)
        for stale in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final_dir


def read_loop_state(path: str) -> dict:
    """The loop state a checkpoint holds (epoch, step, best metric, topics...), without loading its tensors."""
    with open(os.path.join(path, STATE_FILE)) as handle:
        return json.load(handle)


def load_checkpoint(accelerator, path: str) -> dict:
    """Restore model, optimiser, scheduler and random states; the loop state. A missing random state makes the
    resumed run inexact (other dropout masks and draws): said loudly, naming the file."""
    missing = os.path.join(path, f"random_states_{accelerator.process_index}.pkl")
    if not os.path.isfile(missing):
        logger.warning("%s is missing: the resumed run will not repeat the interrupted one exactly.", missing)
    accelerator.load_state(path)
    return read_loop_state(path)


# options a resumed run may change without changing what it computes (where it logs, saves, reads caches from;
# topic_batches: a resumed run's topics come from its checkpoint)
MAY_DIFFER_ON_RESUME = {"resume_from_checkpoint", "overwrite_output_dir", "output_dir", "logging_steps",
                        "checkpointing_steps", "save_total_limit", "report_to", "push_to_hub", "hub_model_id",
                        "hub_token", "hub_private_repo", "license", "save_adapters", "dataloader_num_workers",
                        "feature_cache_dir", "topic_batches"}


def run_fingerprint(args: tuple, train_pairs, stream=None) -> dict:
    """What an exact resume needs unchanged: every option that shapes the computation, and the training data
    (its number of pairs and a digest of their image ids and captions; of a `stream`, its shards' names, since
    reading them all would cost an epoch)."""
    options = {name: value for name, value in all_options(args).items() if name not in MAY_DIFFER_ON_RESUME}
    digest = hashlib.sha1()
    if stream is not None:
        for unit in stream.sources():
            digest.update(f"{unit}\n".encode())
        return {**options, "train_shards": len(stream.sources()), "train_digest": digest.hexdigest()[:16]}
    for image_id, caption in zip(train_pairs["image_id"], train_pairs["caption"]):
        digest.update(f"{image_id}\t{caption}\n".encode())
    return {**options, "train_pairs": len(train_pairs), "train_digest": digest.hexdigest()[:16]}


def resume_run(accelerator, path: str, fingerprint: dict) -> dict:
    """The loop state of checkpoint `path`, its tensors and random states restored, after checking it was taken in a
    run with the same options and data (`run_fingerprint`): a resume with others would not continue that run."""
    changed = resume_mismatches(read_loop_state(path).get("fingerprint", {}), fingerprint)
    if changed:
        raise SystemExit(f"error: --resume_from_checkpoint {path} was taken in a run with other options or data: "
                         f"{'; '.join(changed)}. Resume with the same ones, or start a new run in another "
                         "--output_dir (or with --overwrite_output_dir true).")
    state = load_checkpoint(accelerator, path)
    logger.info("resumed from %s at epoch %d, step %d", path, state["epoch"], state["global_step"])
    return state


def resume_mismatches(saved: dict, current: dict) -> list[str]:
    """What differs between the run a checkpoint was taken in and this one (`run_fingerprint`s), as
    `name: saved -> now` lines; empty when they match (checkpoints from before fingerprints match anything)."""
    return [f"{name}: {saved[name]!r} -> {current.get(name)!r}" for name in sorted(saved)
            if saved[name] != current.get(name)]
