"""The loop's side of a streamed run (`--streaming true`): each epoch's batches, and the stream's place in checkpoints.

What differs from the map-style loader (`data.make_train_loader`), and why:

* Each process reads its own stream (`data_scripts.streaming`: shards split by process, then by loader worker), so
  its DataLoader is never passed through `accelerator.prepare`, whose sharding of an iterable data set would split
  the data a second time. Batches are moved to the device here instead.
* Ranks get different numbers of batches (shards differ in length): an epoch ends for every rank when the first
  runs out (`dualencoder.distributed.every_rank` before each batch), or the others would wait for ever in DDP's
  next all-reduce. The rows the longer ranks had left that epoch are not trained on; shards of similar size keep
  that small. With several processes the last, smaller batch of each loader worker is dropped, since the loss's
  all-gather needs equal batch sizes.
* The position (per rank and loader worker: shards done, rows read into the current one) is gathered from every
  rank into the checkpoint's trainer state (`state["stream"]`); a resumed run continues from it. Shards already
  done are not opened again; the current shard (tar in stream mode), or a `load_dataset` stream (which cannot seek
  at all), is read again from its start up to the position, which the stream logs.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import torch
from accelerate.utils import gather_object, send_to_device
from torch.utils.data import DataLoader

from data_scripts.streaming import POSITION
from dualencoder.distributed import every_rank

logger = logging.getLogger(__name__)


class StreamedEpochs:
    """Batches of a process's training stream, one pass per epoch, ending together on every rank."""

    def __init__(self, stream, transform, collator, accelerator, *, batch_size: int, num_workers: int):
        stream.transform = transform  # rows arrive as the model's inputs, as the map-style rows do
        self.stream, self.collator, self.accelerator = stream, collator, accelerator
        self.batch_size, self.num_workers = batch_size, num_workers

    def epoch(self, epoch: int) -> Iterator[dict]:
        """This epoch's batches, on the device, from the position a resumed run restored."""
        self.stream.set_epoch(epoch)  # keeps a restored position of this same epoch
        # a new loader each epoch, no persistent workers: their copy of the stream would keep the old epoch's order
        # an own generator: creating the iterator must not draw from the global RNG, or a resumed run (whose RNG
        # state was restored before its iterator exists) would get other dropout masks than the interrupted one
        loader = DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=self.stream.collate(self.collator), drop_last=self.accelerator.num_processes > 1,
                            pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(self.stream.seed * 1000 + epoch))
        batches = iter(loader)
        while True:
            batch = next(batches, None)
            if not every_rank(batch is not None, self.accelerator.device):
                return
            self.stream.update(batch.pop(POSITION))  # consumed once the loop holds it: a checkpoint after its step
            yield send_to_device(batch, self.accelerator.device)

    def state_dict(self) -> list[dict]:
        """Every rank's stream position, in rank order (every process must call it: it is a collective)."""
        state = self.stream.state_dict()
        return gather_object([state]) if self.accelerator.num_processes > 1 else [state]

    def load_state_dict(self, states: Optional[list[dict]]) -> None:
        """Continue from this rank's saved position (`states` from `state_dict`); the stream checks that the processes
        and seed are those of the saved run."""
        if not states:
            logger.warning("the checkpoint holds no stream position: the stream starts its epoch from the beginning")
            return
        if len(states) != self.accelerator.num_processes:
            raise SystemExit(f"error: the checkpoint's stream position is for {len(states)} processes, this run has "
                             f"{self.accelerator.num_processes}: resume a streamed run with the same number of processes")
        self.stream.load_state_dict(states[self.accelerator.process_index])
        done = {worker: position for worker, position in self.stream.positions.items()}
        logger.info("stream resumed at epoch %d: (shards done, rows into the next) per loader worker %s",
                    self.stream.epoch, done)
