"""Global negatives across 2 CPU processes (gloo) against one process holding the whole batch.

The 2-process run happens once (module fixture): each process takes half of a fixed global batch,
embeds it with a tiny two-tower model wrapped in real DistributedDataParallel, computes a loss and
calls backward, so DDP averages the gradients over processes exactly as in training. Process 0's
averaged gradients (identical on both) and both loss values come back through files and are
compared with a single process computing the same loss on the whole global batch.
"""

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dualencoder.distributed import decided_by_main, first_error, gather_features, world_info
from dualencoder.losses import build_loss

WORLD = 2
LOCAL = 4
GLOBAL = WORLD * LOCAL
# Each process's ids as the collator builds them: an id names one image on every process, so image 2 has a
# caption on each process (positives across processes) and rank 1's 10, 11 are other images.
LOCAL_IDS = [[0, 1, 0, 2], [10, 11, 11, 2]]
LOCAL_IDS_AS_GLOBAL = LOCAL_IDS[0] + LOCAL_IDS[1]

# (case name, loss name, loss options, which ids)
CASES = [
    ("clip", "clip", {}, None),
    ("clip_local", "clip", {"local_loss": True}, None),
    ("clip_local_ids", "clip", {"local_loss": True}, "local"),
    ("siglip", "siglip", {}, None),
    ("siglip_local_ids", "siglip", {"local_loss": True}, "local"),
    ("ntxent_local_ids", "ntxent", {}, "local"),
    ("ntxent_local", "ntxent", {"local_loss": True}, "local"),
    ("triplet", "triplet", {"margin": 0.5}, None),
    ("triplet_local_sum", "triplet", {"margin": 0.5, "local_loss": True, "max_violation": False}, "local"),
    ("clip+triplet", "clip+triplet", {"triplet_weight": 0.5, "local_loss": True}, None),
    ("clip_nograd", "clip", {"gather_with_grad": False}, None),
    ("siglip_nograd", "siglip", {"gather_with_grad": False}, None),
]


class TinyDualEncoder(nn.Module):
    """Two linear towers, normalised outputs, CLIP's log-parameterised scale and SigLIP's bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, pixels, tokens):
        return (
            F.normalize(self.image(pixels), dim=-1),
            F.normalize(self.text(tokens), dim=-1),
            self.log_scale.exp(),
            self.bias + 0,  # DDP mishandles a parameter returned as-is from forward
        )


def global_batch():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(GLOBAL, 6, generator=g, dtype=torch.float64)
    return pixels, torch.randn(GLOBAL, 5, generator=g, dtype=torch.float64)


def case_ids(which, rank=None):
    """Ids for a case: the global batch's (rank None) or one process's half."""
    if which is None:
        return None
    if rank is None:
        return torch.tensor(LOCAL_IDS_AS_GLOBAL)
    return torch.tensor(LOCAL_IDS[rank])


def run_case(model, loss_fn, pixels, tokens, ids):
    image, text, logit_scale, bias = model(pixels, tokens)
    loss = loss_fn(image, text, logit_scale, bias, ids)
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return loss.detach(), grads


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=180)
    )
    try:
        results = {"world_info": world_info()}
        pixels, tokens = global_batch()
        mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
        pixels, tokens = pixels[mine], tokens[mine]

        for case, name, options, which in CASES:
            model = nn.parallel.DistributedDataParallel(
                TinyDualEncoder().double(), find_unused_parameters=True  # triplet ignores scale and bias
            )
            loss, grads = run_case(model, build_loss(name, **options), pixels, tokens, case_ids(which, rank))
            results[case] = {"loss": loss, "grads": {k.removeprefix("module."): v for k, v in grads.items()}}

        # gather_features alone: values, order, id handling, gradient routing.
        x = torch.arange(LOCAL * 2, dtype=torch.float64).reshape(LOCAL, 2) + 100 * rank
        x.requires_grad_()
        all_x, all_y, local_ids = gather_features(x, x * 2, torch.tensor(LOCAL_IDS[rank]))
        (all_x * torch.arange(1, GLOBAL + 1, dtype=torch.float64)[:, None]).sum().backward()
        results["gather"] = {
            "all_x": all_x.detach(), "all_y": all_y.detach(), "local_ids": local_ids, "x_grad": x.grad,
        }
        results["first_error"] = first_error("error: rank 1's write failed" if rank == 1 else None)
        results["no_error"] = first_error(None)
        asked = []
        results["decided"] = decided_by_main(lambda: asked.append(rank) or f"answer of rank {rank}")
        results["asked"] = asked
        try:
            decided_by_main(lambda: (_ for _ in ()).throw(SystemExit("error: the Hub refused the token")))
        except SystemExit as stop:
            results["decided_exit"] = stop.code
        try:
            gather_features(torch.zeros(LOCAL + rank, 2), torch.zeros(LOCAL + rank, 2))
            results["unequal"] = "no error"
        except ValueError as error:
            results["unequal"] = str(error)

        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks finish every collective before either tears gloo down: destroying the group
        # while the peer is still mid-operation aborted a worker now and then ("terminate called").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    context = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    # A hang guard, not a speed check: spawning two interpreters that import torch can take minutes
    # on a CI machine that is busy with something else.
    deadline = time.monotonic() + 600
    files = [os.path.join(out_dir, f"rank{r}.pt") for r in range(WORLD)]
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("2-process gloo run timed out")
    except mp.ProcessExitedException:
        # A gloo teardown abort after both ranks saved complete results does not touch what the
        # tests check; a failure before that (no result file) still fails every test here.
        if not all(os.path.exists(f) for f in files):
            raise
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(f) for f in files]


def single_process_reference(name, options, which):
    options = {k: v for k, v in options.items() if k not in ("gather_with_grad", "local_loss")}
    pixels, tokens = global_batch()
    return run_case(TinyDualEncoder().double(), build_loss(name, **options), pixels, tokens, case_ids(which))


def test_world_info_outside_and_inside(two_process_results):
    assert world_info() == (0, 1)
    assert [r["world_info"] for r in two_process_results] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("case", [c for c in CASES if c[2].get("gather_with_grad", True)], ids=lambda c: c[0])
def test_ddp_gradient_equals_single_process_gradient(two_process_results, case):
    """gather_with_grad: DDP's averaged gradient is the one-process gradient on the global batch.

    With local_loss=False each process computes the same global loss and the gather's backward
    hands each process W times its share, which DDP's average divides back; with local_loss=True
    the processes' losses are row shares whose mean is the global loss. Either way: exact.
    """
    case_name, name, options, which = case
    ref_loss, ref_grads = single_process_reference(name, options, which)
    losses = torch.stack([r[case_name]["loss"] for r in two_process_results])
    if options.get("local_loss"):
        assert torch.allclose(losses.mean(), ref_loss, atol=1e-10)
    else:
        assert torch.allclose(losses, ref_loss.expand(WORLD), atol=1e-10)
    for rank_results in two_process_results:
        for param, ref in ref_grads.items():
            assert torch.allclose(rank_results[case_name]["grads"][param], ref, atol=1e-10), (case_name, param)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())


@pytest.mark.parametrize("case", [c for c in CASES if not c[2].get("gather_with_grad", True)], ids=lambda c: c[0])
def test_ddp_gradient_without_gather_grad_is_documented_approximation(two_process_results, case):
    """gather_with_grad=False, local_loss=False: towers get 1/W of the exact gradient, scale and bias exact."""
    case_name, name, options, which = case
    ref_loss, ref_grads = single_process_reference(name, options, which)
    got = two_process_results[0][case_name]
    assert torch.allclose(got["loss"], ref_loss, atol=1e-10)
    for param, ref in ref_grads.items():
        factor = 1.0 if param in ("log_scale", "bias") else 1.0 / WORLD
        assert torch.allclose(got["grads"][param], factor * ref, atol=1e-10), param


def test_gather_features_values_order_and_gradient(two_process_results):
    xs = [torch.arange(LOCAL * 2, dtype=torch.float64).reshape(LOCAL, 2) + 100 * r for r in range(WORLD)]
    expected = torch.cat(xs)
    weights = torch.arange(1, GLOBAL + 1, dtype=torch.float64)[:, None].expand(GLOBAL, 2)
    for rank, results in enumerate(two_process_results):
        g = results["gather"]
        assert torch.equal(g["all_x"], expected) and torch.equal(g["all_y"], 2 * expected)
        # Both processes computed sum(w * all_x); backward sums their shares into each owner's slot.
        assert torch.equal(g["x_grad"], WORLD * weights[rank * LOCAL:(rank + 1) * LOCAL])


def test_gather_features_ids(two_process_results):
    for results in two_process_results:
        g = results["gather"]
        local = g["local_ids"].tolist()
        # An id names one image on every process: gathered, the ids are every process's, in rank order.
        assert local == LOCAL_IDS_AS_GLOBAL


def test_a_failure_on_one_process_is_known_to_every_process_with_its_line(two_process_results):
    """(A checkpoint write that fails on one process must end every process, not leave the others waiting.)"""
    assert [r["first_error"] for r in two_process_results] == ["error: rank 1's write failed"] * WORLD
    assert [r["no_error"] for r in two_process_results] == [None] * WORLD
    assert first_error("error: alone") == "error: alone"  # one process: its own outcome


def test_an_answer_only_the_main_process_computes_reaches_every_process(two_process_results):
    """(The Hub check and the resume check: one process asks, all get the answer or the same one-line exit.)"""
    assert [r["decided"] for r in two_process_results] == ["answer of rank 0"] * WORLD
    assert [r["asked"] for r in two_process_results] == [[0], []]
    assert [r["decided_exit"] for r in two_process_results] == ["error: the Hub refused the token"] * WORLD
    assert decided_by_main(lambda: 7) == 7  # one process: computed here


def test_gather_features_unequal_batches_raise_everywhere(two_process_results):
    for results in two_process_results:
        assert "same batch size" in results["unequal"]


def test_gather_features_single_process_is_identity():
    x, y, ids = torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0, 0, 1])
    all_x, all_y, all_ids = gather_features(x, y, ids)
    assert all_x is x and all_y is y and all_ids is ids


# --- a launch whose processes do not see each other -----------------------------------------------------------------

def test_a_launch_whose_processes_each_run_alone_is_refused_saying_what_to_change():
    """`accelerate launch --config_file configs/accelerate/multi_gpu.yaml` (4 processes) on a machine with fewer GPUs:
    the launcher sets WORLD_SIZE=4 in each process, Accelerate falls back to one process in each, every one is rank 0
    and they raced on output_dir (FileNotFoundError on best.tmp). The mismatch is found before any work."""
    from dualencoder.distributed import launch_mismatch

    no_gpu = launch_mismatch({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, num_processes=1, devices=0)
    assert no_gpu.startswith("the launcher started 4 processes (WORLD_SIZE=4, LOCAL_WORLD_SIZE=4) but Accelerate "
                             "sees 1 in this one")
    assert "ACCELERATE_USE_CPU=true torchrun --nproc_per_node N" in no_gpu and "\n" not in no_gpu
    assert "launch at most 2 process(es) per machine" in launch_mismatch({"WORLD_SIZE": "4"}, 1, devices=2)
    # launches that agree: a plain `python run_contrastive.py`, torchrun with 2 processes, two machines of 4
    assert launch_mismatch({}, num_processes=1, devices=0) is None
    assert launch_mismatch({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, num_processes=2, devices=0) is None
    assert launch_mismatch({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, num_processes=8, devices=4) is None
