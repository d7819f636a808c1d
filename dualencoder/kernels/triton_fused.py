"""Triton kernels for the element-wise work around a transformer's matmuls: LayerNorm (optionally of a sum
with the residual) and bias + exact GELU, each with its backward, as autograd functions.

Why: in an eager step every LayerNorm, residual add and activation is its own kernel that reads and writes
whole activations; the matmuls around them are fast, so these memory-bound kernels are a large share of the
step on an H200 (benchmarks/README.md, issue 31). Fusing "add the residual, then normalise" into one kernel
saves a write and a read of the activations; "add the bias, then GELU" lets the matmul run without its
bias epilogue and folds the bias into the activation's single pass. Whether it pays is measured
(`benchmarks/throughput.py --levers fused-triton`), not assumed: torch.compile fuses the same things.

Each kernel handles one row of `N` features (the hidden width) per program, in float32 whatever the input
dtype; outputs have the input's dtype (bf16 under autocast, where torch's own layer_norm would return
float32). This module imports triton at once: import it only when the lever is on. On a CPU, set
`TRITON_INTERPRET=1` before importing it to run the kernels through Triton's interpreter (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

ELEMENTWISE_BLOCK = 1024


@triton.jit
def _layer_norm_forward(X, R, Y, W, B, Mean, Rstd, N, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (centred * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_backward(X, R, DY, DX, W, Mean, Rstd, DW_PARTS, DB_PARTS, M, N,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx row by row; each program also sums dy * x_hat and dy over the rows it took, into its own row of
    DW_PARTS / DB_PARTS (no atomics: the caller adds the programs' rows)."""
    first = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(first, M, programs):
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(R + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        x_hat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        w_dy = w * dy
        dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=0) / N) - tl.sum(w_dy, axis=0) / N) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    tl.store(DW_PARTS + first * N + cols, dw, mask=mask)
    tl.store(DB_PARTS + first * N + cols, db, mask=mask)


@triton.jit
def _bias_gelu_forward(X, B, Y, numel, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(B + offsets % N, mask=mask, other=0.0).to(tl.float32)
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # z / sqrt(2)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward(X, B, DY, DZ, numel, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(B + offsets % N, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # the normal density: 1 / sqrt(2 pi)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DZ + offsets, (dy * (cdf + z * pdf)).to(DZ.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` as a contiguous [rows, width] matrix; Triton's offsets here are 32-bit, so its size is checked."""
    if x.shape[-1] != width:
        raise ValueError(f"the last dimension is {x.shape[-1]}, the parameters' width is {width}")
    if x.numel() >= 2**31:
        raise ValueError(f"{x.numel()} elements: too many for these kernels' 32-bit offsets")
    return x.reshape(-1, width).contiguous()


def _backward_programs(rows: int, device: torch.device) -> int:
    """Programs of the LayerNorm backward: a few per multiprocessor on a GPU (each sums many rows' dw), 4 in
    the interpreter."""
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        width = weight.numel()
        x2 = _rows(x, width)
        r2 = _rows(residual, width) if residual is not None else x2
        y = torch.empty_like(x2)
        mean = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(width)
        _layer_norm_forward[(x2.shape[0],)](x2, r2, y, weight, bias, mean, rstd, width, eps,
                                             HAS_RESIDUAL=residual is not None, BLOCK_N=block,
                                             num_warps=min(max(block // 256, 1), 8))
        ctx.save_for_backward(x2, r2, weight, mean, rstd)
        ctx.has_residual, ctx.shape, ctx.residual_dtype = residual is not None, x.shape, getattr(residual, "dtype", None)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, r2, weight, mean, rstd = ctx.saved_tensors
        rows, width = x2.shape
        dy2 = _rows(dy, width)
        dx = torch.empty_like(x2)
        programs = _backward_programs(rows, x2.device)
        dw_parts = torch.empty(programs, width, device=x2.device, dtype=torch.float32)
        db_parts = torch.empty_like(dw_parts)
        block = triton.next_power_of_2(width)
        _layer_norm_backward[(programs,)](x2, r2, dy2, dx, weight, mean, rstd, dw_parts, db_parts, rows, width,
                                          HAS_RESIDUAL=ctx.has_residual, BLOCK_N=block,
                                          num_warps=min(max(block // 256, 1), 8))
        dw = dw_parts.sum(0).to(weight.dtype)
        db = db_parts.sum(0).to(weight.dtype)
        dx = dx.view(ctx.shape)
        dresidual = dx.to(ctx.residual_dtype) if ctx.has_residual else None  # d(x + r)/dr = d(x + r)/dx
        return dx, dresidual, dw, db, None


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x2 = _rows(x, bias.numel())
        y = torch.empty_like(x2)
        grid = (triton.cdiv(x2.numel(), ELEMENTWISE_BLOCK),)
        _bias_gelu_forward[grid](x2, bias, y, x2.numel(), bias.numel(), BLOCK=ELEMENTWISE_BLOCK)
        ctx.save_for_backward(x2, bias)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        dy2 = _rows(dy, bias.numel())
        dz = torch.empty_like(x2)
        grid = (triton.cdiv(x2.numel(), ELEMENTWISE_BLOCK),)
        _bias_gelu_backward[grid](x2, bias, dy2, dz, x2.numel(), bias.numel(), BLOCK=ELEMENTWISE_BLOCK)
        return dz.view(ctx.shape), dz.sum(0, dtype=torch.float32).to(bias.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm over the last dimension of `x` (+ `residual`, added first, in float32), with its backward."""
    return _LayerNorm.apply(x, residual, weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x + bias), the exact (erf) GELU of nn.GELU() and transformers' "gelu", with its backward."""
    return _BiasGelu.apply(x, bias)
