#!/usr/bin/env python
"""Milliseconds and TFLOP/s of each scaled-dot-product-attention kernel at our towers' shapes.

In the ViT-B/16 + DistilBERT step on the H100, attention is the largest cost after the matmuls
(about 11.5 ms of a 90 ms step, cuDNN's flash kernel, which PyTorch picks first on Hopper), yet it
does only ~5% of the FLOPs. ViT-B/16's sequence of 197 tokens is short and not a multiple of the
kernels' tiles, so which kernel is fastest at this shape is a question to measure, not assume.
This times `torch.nn.functional.scaled_dot_product_attention` forced onto each backend
(`torch.nn.attention.sdpa_kernel`), forward and forward + backward, on random bf16 inputs.
`throughput.py --attention <backend>` then runs the whole training step with that kernel.

FLOPs: forward 4·B·H·L²·D (QKᵀ and PV); backward 2.5× the forward (five L²·D matmuls against
two), the count FlashAttention's papers use.

    python -m benchmarks.attention_kernels --batch_size 256 --out benchmarks/results/attention_kernels_h100.json
"""

from __future__ import annotations

import argparse


import torch

from benchmarks.common import (
    add_threads_argument,
    clock_calls,
    command_line,
    device_info,
    fmt,
    markdown_table,
    median,
    parse_choices,
    pick_device,
    set_threads,
    write_json,
)

# name -> torch.nn.attention.SDPBackend member
BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH"}
# the towers' attention shapes: (heads, sequence length, head dim); the batch comes from --batch_size
SHAPES = {"vit-b16": (12, 197, 64), "distilbert-32": (12, 32, 64)}


def sdpa_backend(name: str):
    """The context manager that restricts SDPA to one backend (`auto`: PyTorch's own choice)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return nullcontext() if name == "auto" else sdpa_kernel([getattr(SDPBackend, BACKENDS[name])])


def attention_flops(batch: int, heads: int, length: int, dim: int, backward: bool) -> float:
    """Matmul FLOPs of one attention call (forward, or forward + backward), as the docstring above counts them."""
    forward = 4.0 * batch * heads * length * length * dim
    return forward * (3.5 if backward else 1.0)


def time_kernel(run, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run()` after `warmup` untimed ones (device clock)."""
    return clock_calls(run, device, warmup, repeats).seconds()


def measure(shape: str, backend: str, args, device: torch.device) -> dict:
    """One row: the backend's forward and forward + backward times at `shape`, or the error it raised there."""
    heads, length, dim = SHAPES[shape]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch_size, heads, length, dim, generator=generator).to(device, dtype).requires_grad_()
               for _ in range(3))
    grad = torch.randn(args.batch_size, heads, length, dim, generator=generator).to(device, dtype)
    attend = torch.nn.functional.scaled_dot_product_attention
    row = dict(shape=shape, backend=backend, batch_size=args.batch_size, heads=heads, length=length, head_dim=dim,
               precision=args.precision)
    try:
        with sdpa_backend(backend):
            out = attend(q, k, v)
        if args.check:  # float64 runs on the math path only, so the reference is taken outside the context
            with torch.no_grad():
                reference = attend(q.double(), k.double(), v.double())
            row["rel_error"] = float((out.detach().double() - reference).norm() / reference.norm())
        with sdpa_backend(backend):

            def forward():
                with torch.no_grad():
                    attend(q, k, v)

            def forward_backward():  # autograd.grad returns the gradients: nothing accumulates into .grad
                torch.autograd.grad(attend(q, k, v), (q, k, v), grad)

            for name, run, backward in (("forward", forward, False), ("forward_backward", forward_backward, True)):
                seconds = median(time_kernel(run, device, args.warmup, args.repeats))
                row[f"{name}_ms"] = 1000 * seconds
                row[f"{name}_tflops"] = attention_flops(args.batch_size, heads, length, dim, backward) / seconds / 1e12
    except RuntimeError as err:  # the backend does not support this shape, dtype or device
        row["error"] = str(err).splitlines()[0][:200]
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="all", help=f"comma list of auto, {', '.join(BACKENDS)}, or 'all'")
    parser.add_argument("--shape", default="all", help=f"comma list of {', '.join(SHAPES)}, or 'all'")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check", action="store_true",
                        help="also compare each kernel's output with a float64 reference (relative error)")
    add_threads_argument(parser)
    parser.add_argument("--out", default="benchmarks/results/attention_kernels.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device()
    backends = parse_choices(args.backend, ("auto",) + tuple(BACKENDS))
    shapes = parse_choices(args.shape, tuple(SHAPES))
    rows = [measure(shape, backend, args, device) for shape in shapes for backend in backends]
    table = [[r["shape"], r["backend"]] + ([f"error: {r['error']}", "", "", "", ""] if "error" in r else
                                           [fmt(r["forward_ms"], 3), f"{r['forward_tflops']:.3g}",
                                            fmt(r["forward_backward_ms"], 3), f"{r['forward_backward_tflops']:.3g}",
                                            f"{r['rel_error']:.1e}" if "rel_error" in r else ""])
             for r in rows]
    print(markdown_table(["shape", "backend", "forward ms", "forward TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
                          "rel. error vs fp64"], table, right_from=2))
    result = {**device_info(device), "command": command_line(argv), "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
