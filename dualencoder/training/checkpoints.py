"""Resumable checkpoints that a crash can never leave half-written where resume would find them.

They live apart from the exported model, in `output_dir/checkpoints/` (`checkpoint-<step>` and the best model so
far, `best-<step>`), so `output_dir` holds only what a Hub repository should. A checkpoint keeps only what trains (the
trained weights, their optimiser state, the schedule, every process's random state, the loop state): frozen
backbone weights are rebuilt from the options on resume, so with frozen towers a checkpoint is a small part of the
model's size. It is written to `checkpoint-<step>.tmp` and renamed to `checkpoint-<step>` only when complete (the
rename is atomic); resume considers only directories holding `trainer_state.json`, which is written last, and
reads every file before using one: a damaged checkpoint is named with its damaged file, and `latest` falls back to
the newest intact one. The same write-then-rename protects the best model's directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dualencoder.distributed import first_error
from dualencoder.errors import first_line
from dualencoder.training.arguments import all_options

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/: checkpoint-<step>/ and best-<step>/, apart from the export
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what every checkpoint holds (accelerator.save_state's model, optimiser and schedule, then our loop state); the
# random states (one per process) are checked when present: a missing one is a warning on resume
NEEDED_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", STATE_FILE)


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def best_model_dir(output_dir: str, state: dict) -> Optional[str]:
    """The best model so far of the run at loop state `state` (the export loads it at the end), None before any.

    Each best model is kept under its own step, `checkpoints/best-<step>`, named in the loop state, for as long as
    a kept checkpoint names it: a run resumed from an older checkpoint then finds that checkpoint's best model, not
    one from the later part of the run it abandons. (`checkpoints/best`: a run from before per-step best models.)
    """
    if state.get("best_dir"):
        return os.path.join(checkpoints_dir(output_dir), state["best_dir"])
    before = os.path.join(checkpoints_dir(output_dir), "best")
    return before if os.path.isdir(before) else None


def new_best_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(output_dir), f"best-{step}")


def _drop_unnamed_best_models(folder: str, state: dict) -> None:
    """Delete the `best-<step>` models that neither `state` nor a kept checkpoint names (e.g. an older best, or one
    saved in the abandoned part of a resumed run)."""
    named = {state.get("best_dir")}
    for path in _checkpoints_in(folder):
        try:
            named.add(read_loop_state(path).get("best_dir"))
        except (OSError, ValueError):  # a damaged state file: that checkpoint cannot be resumed anyway
            continue
    for name in os.listdir(folder):
        if re.fullmatch(r"best-\d+", name) and name not in named:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _checkpoints_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (a state file written), oldest first."""
    return _checkpoints_in(checkpoints_dir(output_dir))


def refuse_old_layout(output_dir: str) -> None:
    """Checkpoints of the layout before `output_dir/checkpoints/` (`output_dir/checkpoint-<step>`, `best/` beside
    them) resume once moved; found where a run would not look for them, they are refused with the command."""
    old = _checkpoints_in(output_dir)
    if old:
        names = " ".join(os.path.basename(path) for path in old)
        best = " best" if os.path.isdir(os.path.join(output_dir, "best")) else ""
        raise SystemExit(f"error: {output_dir} holds checkpoints in the old layout ({names}); checkpoints now live in "
                         f"{checkpoints_dir(output_dir)}: move them there (cd {output_dir} && mkdir -p {CHECKPOINTS} "
                         f"&& mv {names}{best} {CHECKPOINTS}/) and run again.")


def damage(path: str) -> Optional[str]:
    """What is wrong with checkpoint `path` ("<file>: missing" or "<file>: unreadable (...)"), None if intact.

    Every file is read whole, as resuming would read it: a truncated write (a full disk, a kill) is found before
    the run has loaded half a checkpoint."""
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    for name in NEEDED_FILES:
        if name not in names:
            return f"{name}: missing"
    for name in sorted(names):
        file = os.path.join(path, name)
        try:
            if name.endswith(".json"):
                with open(file) as handle:
                    json.load(handle)
            elif name.endswith(".safetensors"):
                load_file(file)
            elif name.endswith((".bin", ".pkl")):
                torch.load(file, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any reader's error means the same: this file is damaged
            return f"{name}: unreadable ({first_line(error)[:160]})"
    return None


def _intact_before(checkpoints: list[str], path: Optional[str] = None) -> tuple[Optional[str], list[str]]:
    """The newest intact checkpoint older than `path` (all of them when None), and the damaged ones passed over."""
    older = checkpoints[:checkpoints.index(path)] if path in checkpoints else checkpoints
    damaged = []
    for candidate in reversed(older):
        problem = damage(candidate)
        if problem is None:
            return candidate, damaged
        damaged.append(f"{candidate}: {problem}")
    return None, damaged


def earlier_checkpoints(output_dir: str, resume: Optional[str], overwrite: bool) -> list[str]:
    """The checkpoints of an earlier run in `output_dir` that a new run must delete first (`overwrite`).

    A new run (no `resume`) in a folder holding checkpoints is refused: checkpoint rotation deletes the
    lowest step numbers, which would be the new run's own, and `--resume_from_checkpoint latest` after a
    crash would continue the old run.
    """
    if not overwrite:
        refuse_old_layout(output_dir)
    existing = list_checkpoints(output_dir) + (_checkpoints_in(output_dir) if overwrite else [])
    if not existing or resume:
        return []
    if overwrite:
        return existing
    names = ", ".join(os.path.basename(path) for path in existing)
    raise SystemExit(f"error: {output_dir} already holds checkpoints of an earlier run ({names}). Continue that run "
                     "with --resume_from_checkpoint latest, start over with --overwrite_output_dir true (deletes "
                     "them), or pass another --output_dir.")


def resolve_resume(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """`latest` -> the newest intact checkpoint (the damaged ones passed over are logged; None, a new run, when
    there is none, said in the log); a path -> itself, checked: a damaged one is refused, naming its damaged file
    and the previous intact checkpoint to pass instead."""
    if not resume:
        return None
    if resume == "latest":
        refuse_old_layout(output_dir)
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, so this is a new run.",
                           output_dir)
            return None
        intact, damaged = _intact_before(checkpoints)
        if intact is None:
            raise SystemExit(f"error: every checkpoint in {checkpoints_dir(output_dir)} is damaged ({'; '.join(damaged)}"
                             "); start over with --overwrite_output_dir true.")
        for line in damaged:
            logger.warning("--resume_from_checkpoint latest: %s is damaged; resuming from the previous intact "
                           "checkpoint, %s.", line, intact)
        return intact
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise SystemExit(f"error: {resume} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-<step> directory or 'latest'")
    folder = os.path.dirname(os.path.abspath(resume))
    if os.path.basename(folder) != CHECKPOINTS:  # the old layout: its best/ would not be found
        refuse_old_layout(folder)
    problem = damage(resume)
    if problem:
        intact, _ = _intact_before(_checkpoints_in(folder), os.path.join(folder, os.path.basename(resume.rstrip("/"))))
        offer = (f"the previous intact checkpoint is {intact}: pass --resume_from_checkpoint {intact}" if intact
                 else "there is no intact checkpoint before it")
        raise SystemExit(f"error: checkpoint {resume} is damaged ({os.path.join(resume, problem)}); {offer}.")
    return resume


def _fsync_tree(folder: str) -> None:
    """Flush every file under `folder` to the disk, so a rename never publishes a directory whose data a power
    loss could still take back."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def _swap_in(tmp_dir: str, final_dir: str) -> None:
    _fsync_tree(tmp_dir)
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


@contextmanager
def _failing_in_one_line(final_dir: str, remove_tmp: bool = True):
    """A write of `final_dir` (through `final_dir.tmp`) that fails for lack of space or a lost mount ends the run
    with one line saying what is safe (the checkpoints already in place are untouched), not a traceback.
    (`remove_tmp` False: other processes may still be writing into it; it goes once they all stopped.)"""
    try:
        yield
    except OSError as error:
        if remove_tmp:
            shutil.rmtree(final_dir + ".tmp", ignore_errors=True)
        raise SystemExit(f"error: writing {final_dir} failed ({error.strerror or error}); the checkpoints already in "
                         f"{os.path.dirname(final_dir)} are intact: free space (or fix the folder) and continue with "
                         "--resume_from_checkpoint latest.") from None


def write_atomically(final_dir: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_dir)`, then swap `tmp_dir` in place of `final_dir` (one process only)."""
    tmp_dir = final_dir + ".tmp"
    with _failing_in_one_line(final_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        write(tmp_dir)
        _swap_in(tmp_dir, final_dir)


def together(part: Optional[Callable[[], None]]) -> None:
    """Do this process's part of a save (None: it has none), then learn every process's outcome: a part that
    failed with its one error line ends every process with that line, not only its own (the others would
    otherwise wait at the next collective until the launcher stopped them). A barrier with one process or more."""
    error = None
    try:
        if part is not None:
            part()
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # an exit code (a signal's), not a failed write
            raise
        error = stop.code
    error = first_error(error)
    if error:
        raise SystemExit(error)


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, keep: int) -> str:
    """accelerator.save_state (model, optimiser, scheduler, every process's RNG) + our loop state.

    Every process takes part (each writes its own RNG state); the main process alone writes the
    state file last and renames the finished directory into place. A part that fails on any process
    ends every process with its one line (`together`).
    """
    folder = checkpoints_dir(output_dir)
    final_dir = os.path.join(folder, f"checkpoint-{step}")
    tmp_dir = final_dir + ".tmp"
    main = accelerator.is_main_process

    def guarded(write: Callable[[], None]) -> Callable[[], None]:
        def part():
            with _failing_in_one_line(final_dir, remove_tmp=False):
                write()
        return part

    def fresh():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)

    def publish():
        with open(os.path.join(tmp_dir, STATE_FILE), "w") as handle:
            json.dump(state, handle, indent=2)
        _swap_in(tmp_dir, final_dir)

    try:
        together(guarded(fresh) if main else None)
        together(guarded(lambda: accelerator.save_state(tmp_dir)))
        together(guarded(publish) if main else None)
    except SystemExit:
        if main:  # every process has stopped writing (agreed above): the half-written folder goes
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if main:
        for stale in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
        _drop_unnamed_best_models(folder, state)
    accelerator.wait_for_everyone()
    return final_dir


def read_loop_state(path: str) -> dict:
    """The loop state a checkpoint holds (epoch, step, best metric, topics...), without loading its tensors."""
    with open(os.path.join(path, STATE_FILE)) as handle:
        return json.load(handle)


def _frozen_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def keep_trained_weights_only(accelerator) -> None:
    """Make `accelerator.save_state` leave out frozen parameters (the options rebuild them on resume: the resume
    fingerprint guarantees the same options), and `load_state` check that a checkpoint holds every weight that
    trains now (a checkpoint of the old layout holds all of them). Buffers (BatchNorm statistics) are kept."""

    def drop_frozen(models, weights, output_dir):
        for model, state in zip(models, weights):
            for name in _frozen_names(model):
                state.pop(name, None)

    def check_trained_present(models, input_dir):
        for index, model in enumerate(models):
            file = os.path.join(input_dir, f"model{f'_{index}' if index else ''}.safetensors")
            with safe_open(file, framework="pt") as handle:
                missing = sorted(set(model.state_dict()) - _frozen_names(model) - set(handle.keys()))
            if missing:
                raise SystemExit(f"error: {file} lacks {len(missing)} weights that train in this run (e.g. "
                                 f"{missing[0]}): it was saved by a run that trained other parts; resume with its "
                                 "options.")

    accelerator.register_save_state_pre_hook(drop_frozen)
    accelerator.register_load_state_pre_hook(check_trained_present)


def load_checkpoint(accelerator, path: str) -> dict:
    """Restore model, optimiser, scheduler and random states; the loop state. A missing random state makes the
    resumed run inexact (other dropout masks and draws): said loudly, naming the file. Frozen weights are not in
    a checkpoint (`keep_trained_weights_only`): the model keeps the ones it was built with."""
    missing = os.path.join(path, f"random_states_{accelerator.process_index}.pkl")
    if not os.path.isfile(missing):
        logger.warning("%s is missing: the resumed run will not repeat the interrupted one exactly.", missing)
    accelerator.load_state(path, strict=False)
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
