"""Global negatives: gather every process's embeddings so a loss sees the whole global batch.

Contrastive losses get better with more negatives, so under data parallelism each process
all-gathers the embeddings of the others and scores its pairs against the global batch.
Everything about communication lives here, in one function, so it can be tested alone
(`tests/test_distributed.py`) and the losses stay plain tensor arithmetic.

Gradients, and why `gather_with_grad=True` is the default
---------------------------------------------------------
DDP (and Accelerate on top of it) *averages* parameter gradients over the W processes.

* ``gather_with_grad=True`` uses an all-gather whose backward (an all-reduce) sums, over all
  processes, the gradient each one computed for every slot, and hands each process the sum for
  its own slot. If every process computes the same global loss L, process r receives
  ``W * dL/d(its embeddings)``; DDP's average then yields exactly ``dL/dθ``, the gradient of a single
  process holding the whole global batch. The same holds with the losses' ``local_loss=True``
  (process r computes only its rows, L_r, and L = mean_r L_r).
* ``gather_with_grad=False`` gathers detached copies and puts the local tensor back in this
  process's slot (open_clip's trick), so gradient flows only into the local embeddings. Process r
  then gets ``dL/d(its embeddings)`` without the other processes' share, and after DDP's average the
  towers' gradients are ``1/W`` of the exact ones (with ``local_loss=False``; the learnable scale and
  bias still get exact gradients), or miss the terms in which this process's items were other
  processes' negatives (with ``local_loss=True``). It saves the backward communication.

Image ids across processes
--------------------------
Losses use ``image_ids`` to avoid treating two captions of one image as negatives. The collator
makes them a stable number of the image-id string (`data_scripts.collator.image_ids_to_tensor`), the
same on every process, so gathered ids are concatenated as they are: one image whose captions landed
on two processes is one image (positives), and a row that Accelerate's ``even_batches`` repeated to
pad a short last step is a positive of its original, never a negative of itself. (Until 2026-12 the
ids were per-batch numbers relabelled per process, which made both of those false negatives.)

Every process must pass the same number of rows (all-gather needs equal shapes; Accelerate's
default ``even_batches=True`` or ``drop_last`` guarantees it). Unequal sizes raise ``ValueError``
on every process at once instead of hanging; the check is one tiny all-gather (and a host sync)
per call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dualencoder.errors import first_line

__all__ = ["world_info", "gather_features", "every_rank", "first_error", "decided_by_main", "launch_mismatch"]


def world_info() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when torch.distributed is absent or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def every_rank(flag: bool, device) -> bool:
    """Whether `flag` holds on every process (one all-reduce of a single number); `flag` itself with one process.

    A streamed epoch ends for all ranks when the first runs out of data: a rank that stopped alone would leave
    the others waiting for ever in their next collective (DDP's gradient all-reduce, the loss's all-gather).
    """
    rank, world_size = world_info()
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def first_error(error: str | None) -> str | None:
    """The first (in rank order) of every process's `error` (None: this process's part went well), on every process.

    A write that only one process does (or one that fails on one process only) must not leave the others waiting
    at the next collective until the launcher stops them: each process passes its outcome here and all of them
    learn whether to stop, with the same line. One all-gather of small objects; `error` itself with one process.
    """
    _, world_size = world_info()
    if world_size == 1:
        return error
    errors = [None] * world_size
    try:
        dist.all_gather_object(errors, error)
    except RuntimeError as lost:  # (gloo's DistBackendError) a peer's connection closed mid-exchange: it has stopped
        return error or f"error: another process stopped during this save ({first_line(lost, with_type=False)})"
    found = next((e for e in errors if e), None)
    if found:  # every process has the answer before any exits and closes its connections, mid-exchange for another
        try:
            dist.barrier()
        except RuntimeError:  # one that exited after this barrier: the answer is known already
            pass
    return found


def decided_by_main(decide):
    """`decide()` run by the main process (rank 0) only, its result given to every process.

    For work whose answer is the same everywhere but costs something to get: asking the Hub whether the token may
    push (N processes would each call it), checking that a checkpoint to resume is intact (each would read every
    file of it). A one-line `SystemExit` of the main process's `decide()` ends every process with that line; any
    other failure there ends the others with its first line (they would otherwise wait in the broadcast until the
    launcher's timeout). `decide()` itself with one process. One broadcast of a small object.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return decide()
    outcome, failure = [None], None
    if rank == 0:
        try:
            outcome = [("value", decide())]
        except SystemExit as stop:
            outcome = [("exit", stop.code if isinstance(stop.code, str) else f"error: the main process exited "
                                                                              f"({stop.code})")]
        except BaseException as error:  # noqa: BLE001 - re-raised below, once the others know
            outcome, failure = [("exit", f"error: the main process failed ({first_line(error)})")], error
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if failure is not None:
        raise failure
    if kind == "exit":
        raise SystemExit(value)
    return value


def launch_mismatch(env, num_processes: int, devices: int) -> str | None:
    """Why this launch is broken, or None: the launcher started `WORLD_SIZE` processes but Accelerate sees
    `num_processes`.

    `accelerate launch --config_file configs/accelerate/multi_gpu.yaml` on a machine with fewer GPUs than
    `num_processes` (or none) starts the processes, yet each one falls back to a single-process run: every process is
    rank 0, all of them write output_dir at once, and the run crashes later on a file another one moved. `env` is
    the environment (os.environ), `devices` the number of GPUs this process sees.
    """
    launched = int(env.get("WORLD_SIZE") or 1)
    if launched == num_processes:
        return None
    local = env.get("LOCAL_WORLD_SIZE")
    # (`accelerate launch --cpu` runs one process whatever --num_processes says; torchrun starts several on a CPU)
    fix = (f"launch at most {devices} process(es) per machine (--num_processes, or num_processes in the accelerate "
           "config)" if devices else "launch on a machine with GPUs, or run CPU processes (gloo) with "
           "`ACCELERATE_USE_CPU=true torchrun --nproc_per_node N run_contrastive.py ...` (doc/SCALING.md)")
    return (f"the launcher started {launched} processes (WORLD_SIZE={launched}"
            f"{f', LOCAL_WORLD_SIZE={local}' if local else ''}) but Accelerate sees {num_processes} in this one, so "
            f"each would run alone as rank 0 and they would overwrite each other's output_dir; this machine has "
            f"{devices} GPU(s): {fix}")


def _check_equal_sizes(n: int, device: torch.device, world_size: int) -> None:
    """Raise on every process if the processes' batch sizes differ (all-gather would hang or fail)."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"gather_features needs the same batch size on every process, got {sizes}; "
            "use drop_last=True or Accelerate's even_batches=True"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the *sum over processes* of the
    gradient for its own rows: every process's loss may depend on every row, so the owner of a
    row must receive all of those contributions. (What torch.distributed.nn.functional.all_gather
    does; written out because that function is deprecated and the semantics are the point.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = world_info()
        ctx.rows = slice(rank * tensor.shape[0], (rank + 1) * tensor.shape[0])
        chunks = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming buffer is not ours
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # a reduce-scatter would send less; gloo lacks it
        return grad[ctx.rows]


def _gather_without_grad(tensor: torch.Tensor, rank: int, world_size: int) -> list[torch.Tensor]:
    """All-gather detached copies, then put the local tensor (with its graph) back in its slot."""
    chunks = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(chunks, tensor.detach().contiguous())
    chunks[rank] = tensor
    return chunks


def gather_features(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    *,
    gather_with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All-gather embeddings (and image ids) from every process, concatenated in rank order.

    Returns ``(all_image [W*B, D], all_text [W*B, D], all_ids [W*B] or None)``; this process's rows
    are ``rank*B : (rank+1)*B``. With one process the inputs come back unchanged.

    ``gather_with_grad`` chooses between exact gradients (backward sums every process's share
    into each slot) and the cheaper local-slot-only gradient; see the module docstring.
    ``image_ids`` mean the same image on every process (the collator's stable numbers): concatenated as they are.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return image_embeds, text_embeds, image_ids
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"image and text batch sizes differ: {image_embeds.shape[0]} vs {text_embeds.shape[0]}")
    _check_equal_sizes(image_embeds.shape[0], image_embeds.device, world_size)

    if gather_with_grad:
        all_image = _AllGatherWithGrad.apply(image_embeds)
        all_text = _AllGatherWithGrad.apply(text_embeds)
    else:
        all_image = torch.cat(_gather_without_grad(image_embeds, rank, world_size), dim=0)
        all_text = torch.cat(_gather_without_grad(text_embeds, rank, world_size), dim=0)

    if image_ids is None:
        return all_image, all_text, None
    ids = image_ids.to(device=image_embeds.device, dtype=torch.long).contiguous()
    id_chunks = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(id_chunks, ids)
    return all_image, all_text, torch.cat(id_chunks)
