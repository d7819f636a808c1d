"""GradCache: a contrastive loss over a batch larger than the activations that fit in memory.

A contrastive loss needs every image embedding against every text embedding of the batch, but
its gradient with respect to the *parameters* only flows through each row's own embedding. So
(Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):

1. embed the batch chunk by chunk without building a graph (only the [B, D] embeddings are kept);
2. take the loss over the whole batch's embeddings and backpropagate it to the embeddings (and to
   anything the loss itself owns, e.g. a learnable temperature);
3. run each chunk again, this time with a graph, and backpropagate that chunk's cached embedding
   gradient through the tower.

Peak activation memory is one chunk's, whatever the batch; the price is a second forward of the
towers. Each chunk's random state (CPU and CUDA generators) is saved before its first forward and
restored for the second, so dropout draws the same masks and the gradients are those of one
backward through the chunked forward. The caller's random state afterwards is what the first pass
left, as if the towers had run once.

Exact for towers whose rows do not interact. A tower in training mode with BatchNorm normalises
by each chunk's statistics (not the batch's) and updates its running statistics twice per step.

The functions see the model only through `encode_images(chunk) -> [n, D]`,
`encode_texts(chunk) -> [n, D]` and `loss_fn(image_embeds, text_embeds) -> scalar`, so this
module imports nothing of the toolkit.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch

Inputs = dict  # keyword tensors of one modality, each with the batch as its first dimension


def split_inputs(inputs: Inputs, chunk_size: int) -> list[Inputs]:
    """`{"pixel_values": [B, ...]}` -> one dict per chunk of at most `chunk_size` rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not inputs:
        raise ValueError("no inputs to split")
    sizes = {value.shape[0] for value in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
    pieces = {key: value.split(chunk_size) for key, value in inputs.items()}
    return [dict(zip(pieces, chunk)) for chunk in zip(*pieces.values())]


class RandomState:
    """The CPU generator's state and that of every CUDA device among `tensors`, to replay later."""

    def __init__(self, tensors):
        self.devices = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                               for t in tensors if t.device.type == "cuda"})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.devices]

    @contextmanager
    def replay(self):
        """Run the block from the saved state; the generators are put back as they were afterwards."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _embed_without_graph(encode: Callable[[Inputs], torch.Tensor], chunks: list[Inputs]):
    """Step 1 for one modality: the chunks' embeddings (no graph) and each chunk's random state."""
    states, embeds = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState(chunk.values()))
            embeds.append(encode(chunk))
    return torch.cat(embeds), states


def _backward_chunks(encode: Callable[[Inputs], torch.Tensor], chunks: list[Inputs], states: list[RandomState],
                     grads: torch.Tensor) -> None:
    """Step 3 for one modality: re-run each chunk with a graph and push its cached gradient through."""
    start = 0
    for chunk, state in zip(chunks, states):
        with state.replay():
            embeds = encode(chunk)
        embeds.backward(grads[start:start + embeds.shape[0]].to(embeds.dtype))
        start += embeds.shape[0]


def grad_cache_backward(encode_images: Callable[[Inputs], torch.Tensor], encode_texts: Callable[[Inputs], torch.Tensor],
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], image_inputs: Inputs,
                        text_inputs: Inputs, chunk_size: int, autocast: Callable = nullcontext) -> torch.Tensor:
    """Accumulate into `.grad` the gradients of `loss_fn(all image embeds, all text embeds)`; return the loss.

    The towers run on at most `chunk_size` rows at a time. Gradients add to what `.grad` already
    holds, as `loss.backward()` does. The returned loss is detached. The forwards (towers and
    loss) run inside `autocast()` (e.g. an Accelerator's), the backwards outside it.
    """
    encode_images, encode_texts, loss_fn = (_under(autocast, fn) for fn in (encode_images, encode_texts, loss_fn))
    image_chunks, text_chunks = split_inputs(image_inputs, chunk_size), split_inputs(text_inputs, chunk_size)
    image_embeds, image_states = _embed_without_graph(encode_images, image_chunks)
    text_embeds, text_states = _embed_without_graph(encode_texts, text_chunks)
    image_embeds.requires_grad_(True)
    text_embeds.requires_grad_(True)
    loss = loss_fn(image_embeds, text_embeds)
    loss.backward()  # to the cached embeddings, and to the loss's own parameters (temperature, bias)
    _backward_chunks(encode_images, image_chunks, image_states, image_embeds.grad)
    _backward_chunks(encode_texts, text_chunks, text_states, text_embeds.grad)
    return loss.detach()


def _under(context: Callable, fn: Callable) -> Callable:
    def run(*args):
        with context():
            return fn(*args)

    return run


IMAGE_KEYS = ("pixel_values",)
TEXT_KEYS = ("input_ids", "attention_mask")


def dual_encoder_grad_cache_backward(model, loss, batch: dict, chunk_size: int,
                                     autocast: Callable = nullcontext) -> torch.Tensor:
    """`grad_cache_backward` for a DualEncoderModel batch (pixels, token ids), through the model's public API.

    `loss` is a `dualencoder.losses` loss, taken (with the batch's `image_ids` if any) at the model's
    temperature `get_logit_scale()` and bias, so those get their gradients too; the towers run through
    `get_image_features` / `get_text_features` (the forward's own path for pixels and token ids).
    """
    if "pixel_values" not in batch or "input_ids" not in batch:
        raise ValueError("GradCache runs both towers on raw inputs: the batch needs pixel_values and input_ids "
                         f"(got {sorted(batch)}); cached features need no chunking")

    def loss_fn(image_embeds, text_embeds):
        return loss(image_embeds, text_embeds, model.get_logit_scale(), logit_bias=model.logit_bias,
                    image_ids=batch.get("image_ids"))  # rows showing one image are not negatives

    return grad_cache_backward(lambda chunk: model.get_image_features(**chunk),
                               lambda chunk: model.get_text_features(**chunk), loss_fn,
                               {k: batch[k] for k in IMAGE_KEYS if k in batch},
                               {k: batch[k] for k in TEXT_KEYS if k in batch}, chunk_size, autocast)
