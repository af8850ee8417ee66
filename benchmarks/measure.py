"""How bench.py and its peers time and measure: synchronised timers, runs taken in turns,
peak memory, a step clock for generation, the device's peak FLOP/s, and each row reported
the moment it is measured."""

import json
import os
import sys
import time

import torch

from common import DTYPES, autocast, peak_flops


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak_memory(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size to the current one


def peak_memory_mb(device):
    """Max allocated on GPU; on Linux CPUs the process's peak resident memory."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class StepClock:
    """When each token of a generation appeared: a transformers streamer (put() gets the prompt,
    then every new token), also fed by hand for grafito's engine."""

    def __init__(self, device):
        self.device, self.times = device, [time.perf_counter()]

    def put(self, value):
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def first_token_and_decode(self):
        """(seconds to the first new token, seconds of the tokens after it)."""
        return self.times[2] - self.times[0], self.times[-1] - self.times[2]


class StepTimer:
    """One model and its optimizer taking training steps on fixed batches."""

    def __init__(self, model, optimizer, device, dtype, compile_model):
        self.model, self.optimizer = model, optimizer
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.device, self.dtype = device, dtype

    def step(self, **inputs):
        with autocast(self.device, self.dtype):
            out = self.forward(**inputs)  # grafito: idx, targets and the supervised positions, as train.py gives them
        self.finish(out[1] if isinstance(out, tuple) else out.loss)

    def finish(self, loss):
        """The backward pass and the optimizer step."""
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def interleaved(timers, repeats, warmup):
    """{name: [result, ...]}: each timer (a callable returning seconds) run in turns, after warm-up."""
    for _, timer in timers:
        for _ in range(warmup):
            timer()
    times = {name: [] for name, _ in timers}
    for _ in range(repeats):
        for name, timer in timers:
            times[name].append(timer())
    return times


def measured_peak(device, dtype):
    """FLOP/s of the device: datasheet for known GPUs, else the best of a few large matmuls."""
    known = peak_flops(device, dtype)
    if known:
        return known, "datasheet"
    size = 2048
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    best = min(timed(lambda: a @ b, device) for _ in range(6))
    return 2 * size ** 3 / best, f"measured ({size}^3 {dtype} matmul)"


def measured_copy_bandwidth(device, megabytes=256):
    """Bytes read and written per second by the best of a few copies of a large tensor: the
    memory bandwidth a decode step, which streams every weight once, is measured against."""
    source = torch.ones(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.zeros_like(source)
    best = min(timed(lambda: target.copy_(source), device) for _ in range(6))
    return 2 * source.numel() / best / 1e9


class RowReport:
    """Each row the moment it is measured: one line on stderr and, when a file is given, one JSON
    line appended to it, so that a run stopped by a time limit still leaves its finished rows."""

    def __init__(self, jsonl_path=""):
        self.path = jsonl_path

    def record(self, **fields):
        """A JSON line that is not a row (the run's header), for readers of the file."""
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")

    def row(self, row):
        figures = [f"{row['tokens_per_s']:,.1f} tokens/s"]
        if row.get("step_ms") is not None:
            figures.append(f"{row['step_ms']:,.2f} ms/{'token' if row['row'].startswith('decode') else 'step'}")
        if row.get("mfu") is not None:
            figures.append(f"MFU {row['mfu']:.1%}")
        if row.get("ttft_p50_s") is not None:
            figures.append(f"first token p50 {row['ttft_p50_s']:.3f} s, p95 {row['ttft_p95_s']:.3f} s")
        if row.get("memory_mb") is not None:
            figures.append(f"peak {row['memory_mb']:,.0f} MB")
        if row.get("weights_gb_s"):
            figures.append(f"weights read {row['weights_gb_s']:,.1f} GB/s ({row['of_copy_bandwidth']:.0%} of copy)")
        print(f"row: {row['row']} | {row['impl']} | {row['batch']} | {', '.join(figures)}", file=sys.stderr, flush=True)
        self.record(**row)
        return row
