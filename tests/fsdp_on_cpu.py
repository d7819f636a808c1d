"""run_contrastive.py under Accelerate's FSDP2 on CPU processes (gloo), for tests on machines without GPUs.

    ACCELERATE_USE_CPU=true <the FSDP_* variables accelerate launch sets from configs/accelerate/fsdp.yaml> \\
        torchrun --standalone --nproc_per_node 2 tests/fsdp_on_cpu.py <run_contrastive.py options>

Accelerate applies FSDP only to GPU processes: with CPU processes it sets up plain data parallelism and
drops the FSDP plugin. This lifts that one choice (the run's Accelerator is switched to FSDP with the
plugin read from the same variables), then runs the unchanged script: model preparation (`fully_shard`
of each block, then the root), training steps, checkpoints, gathering and export are Accelerate's and
torch's own FSDP2 code, on gloo instead of NCCL.
"""

import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_plain_init = Accelerator.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _plain_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState copies it back
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables


if __name__ == "__main__":
    Accelerator.__init__ = _init_with_fsdp
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import run_contrastive

    run_contrastive.main(sys.argv[1:])
