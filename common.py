"""Small helpers shared by every script: the user-facing error, atomic folder writes,
device and precision set-up (setup()), and FLOP counts against the device's peak."""

import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


THP_SET_BY_GRAFITO = False
_LIBC = None


def keep_cpu_memory():
    """Let freed CPU tensor memory be reused instead of handed back to the OS.

    PyTorch's CPU allocator is plain malloc; glibc serves every block over 32 MB with a
    fresh mmap and unmaps it on free, so each training step's big buffers (weight casts,
    gradients) would be page-faulted in and zeroed again. With mmap off they stay in the
    heap, as with a caching allocator, and trim_cpu_memory() hands free memory back now and
    then. Large tensors also go on transparent huge pages. setup() calls this for CPU runs;
    GRAFITO_SYSTEM_MALLOC=1 skips it (bench.py --compare=hf runs transformers that way).
    """
    if os.environ.get("GRAFITO_SYSTEM_MALLOC") == "1":
        return
    global THP_SET_BY_GRAFITO
    THP_SET_BY_GRAFITO = "THP_MEM_ALLOC_ENABLE" not in os.environ
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by PyTorch at its first large allocation
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            global _LIBC
            libc = ctypes.CDLL("libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
            _LIBC = libc
        except (OSError, AttributeError):  # not glibc: leave the allocator alone
            pass


def trim_cpu_memory():
    """Hand the heap's free memory back to the OS. Buffers of changing sizes (a step's
    supervised-token count varies) fragment the kept heap and would let resident memory
    creep up; the training loop calls this every log_interval steps to bound it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class GrafitoError(Exception):
    """A problem the user can fix (bad input, missing file, offline); printed without a traceback."""


def run_cli(main):
    """Run a script's main(); a GrafitoError becomes one 'error:' line and exit status 2."""
    try:
        main()
    except GrafitoError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def atomic_dir(final_dir):
    """Yield a fresh temporary folder beside final_dir; on success it replaces final_dir.

    An interrupted write leaves final_dir untouched. The swap is two renames; if the process
    dies between them, final_dir is missing and `<final_dir>.old` holds the previous
    version, which the next write puts back (readers use current_version()). Temporary
    folders left by a killed writer of the same final_dir are removed first.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    old = final_dir.with_name(final_dir.name + ".old")
    if not final_dir.exists() and old.exists():
        os.replace(old, final_dir)
    remove_stale_temporaries(final_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-{os.getpid()}-", dir=final_dir.parent))
    try:
        yield tmp
        _share_like_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final_dir)


def replace_dir(new_dir, final_dir):
    """Put the finished folder new_dir (beside final_dir) in final_dir's place, as atomic_dir
    does: final_dir becomes `<final_dir>.old`, new_dir becomes final_dir, the old one goes. For
    writers that build their folder over several runs (prepare/text.py resumes)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if not final_dir.exists() and old.exists():
        os.replace(old, final_dir)
    if final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(new_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(final_dir):
    """Delete `.<name>.tmp-<pid>-*` folders beside final_dir whose writer process is gone."""
    final_dir = Path(final_dir)
    for path in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        match = re.fullmatch(rf"\.{re.escape(final_dir.name)}\.tmp-(\d+)-.*", path.name)
        if match and path.is_dir() and not path.is_symlink() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _share_like_umask(folder):
    """mkdtemp (and safetensors) create owner-only folders and files; give them the permissions
    a plain mkdir/open would, so checkpoints and datasets can be shared like any other file."""
    umask = _current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in Path(folder).rglob("*"):
        if not path.is_symlink():  # a link's target is not ours to change
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _current_umask():
    try:  # Linux says it without changing it
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def current_version(folder):
    """The folder to read for `folder`: itself, or during (or after an interrupted) atomic_dir
    swap its previous version `<folder>.old`. Readers never rename, so they never undo a
    writer's swap; a read that starts in the instant between its two renames can still miss
    both, and says so."""
    folder = Path(folder)
    if not folder.name:  # '.', '/': nothing to swap
        return folder
    old = folder.with_name(folder.name + ".old")
    return old if not folder.exists() and old.is_dir() else folder


def read_text(path, what):
    """A UTF-8 text file's contents, or one clear error naming `what` (e.g. '--start=FILE:x')."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as err:
        raise GrafitoError(f"{what}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise GrafitoError(f"{what}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def setup(device="auto", dtype="auto", seed=None):
    """Resolve and prepare the device and precision a command runs in: (device, dtype name).

    A GPU comes back named with its index (cuda:N) and is made the current one, so bare-'cuda'
    allocations and memory figures go to it; GPUs may use TF32 for float32 matmuls; a CPU
    keeps freed memory (keep_cpu_memory). torch is seeded when a seed is given."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        index = torch.device(device).index
        device = f"cuda:{torch.cuda.current_device() if index is None else index}"
        torch.cuda.set_device(torch.device(device))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device == "cpu":
        keep_cpu_memory()
    dtype = resolve_dtype(dtype, device)
    if seed is not None:
        torch.manual_seed(seed)
    return device, dtype


def resolve_device(device):
    """'auto' picks cuda, then mps, then cpu; anything else must exist on this machine."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise GrafitoError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise GrafitoError(f"device {device!r}: no CUDA GPU is available to this PyTorch build; use --device=cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise GrafitoError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not mps:
        raise GrafitoError(f"device {device!r}: MPS is not available here; use --device=cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise GrafitoError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device):
    """The dtype name for a device. 'auto': bfloat16 on CPUs and on GPUs of compute capability
    8.0 or more (Ampere and newer); float16 (with a gradient scaler) on older GPUs, where
    bfloat16 is only emulated: no flash attention kernel, no compiled kernels. bfloat16 is
    exact enough everywhere but fast only on CPUs with bf16 instructions (AVX-512 BF16, AMX);
    elsewhere pass float32."""
    if dtype == "auto":
        if device.startswith("cuda"):
            major, _ = torch.cuda.get_device_capability(torch.device(device))
            dtype = "bfloat16" if major >= 8 else "float16"
        else:
            dtype = "bfloat16"
    if dtype not in DTYPES:
        raise GrafitoError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    if dtype == "float16" and device.startswith("mps"):
        raise GrafitoError("dtype=float16 trains with a gradient scaler grafito runs on CUDA and CPUs; "
                           "use bfloat16 or float32 on MPS")
    return dtype


def to_device(array, device):
    """A host batch on the device; pinned and asynchronous on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def eval_mode(model):
    """model in eval mode (no dropout) for a while, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast(device, dtype):
    """Mixed precision for the forward pass: autocast in bf16/fp16, nothing in fp32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


# Dense tensor-core peaks in FLOP/s: (bf16/fp16, tf32), from the vendors' datasheets (without
# sparsity). Matched against the device name, longest key first ('L40S' before 'L40' before 'L4').
GPU_PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "GH200": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),  # SXM
    "H800": (989e12, 494e12),
    "H20": (148e12, 74e12),
    "B200": (2250e12, 1100e12),
    "A100": (312e12, 156e12),
    "A800": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),
    "L20": (119.5e12, 59.8e12),
    "L4": (121e12, 60e12),
    "RTX 6000 Ada": (364e12, 182e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "A6000": (154.8e12, 77.4e12),
    "V100": (125e12, None),
    "T4": (65e12, None),
}


def peak_flops(device, dtype):
    """One accelerator's peak FLOP/s for this dtype, or None when unknown (CPUs, unlisted GPUs)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            half, tf32 = GPU_PEAK_FLOPS[key]
            return half if dtype in ("bfloat16", "float16") else tf32
    return None


def device_memory(device):
    """Bytes of memory on the device (all of a GPU's; a CPU's physical memory), or None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed, device, what, advice):
    """Refuse, before allocating, work that cannot fit in the device's memory at all."""
    total = device_memory(device)
    if total is not None and needed > total:
        raise GrafitoError(f"{what} needs about {needed / 2 ** 30:,.1f} GiB, more than the {total / 2 ** 30:,.1f} GiB "
                           f"of memory on {device}; {advice}")


def training_flops(config, n_tokens, n_supervised, seq_len, lora=False):
    """Matmul FLOPs of a forward+backward over n_tokens, logits at n_supervised positions.

    Counts what grafito computes: the output layer only where the loss is taken, and with
    LoRA no weight gradients for the frozen matrices (their backward is one matmul, not two).
    Attention scores count all seq_len keys (PaLM's convention); LoRA's own tiny matmuls are left out.
    """
    C, L = config.n_embd, config.n_layer
    weight_pass = 4 if lora else 6  # forward 2 + input grads 2 (+ weight grads 2 when trained)
    body = weight_pass * L * (4 * C * C + 2 * C * config.mlp_width) * n_tokens
    attention = 12 * L * C * seq_len * n_tokens
    head = weight_pass * C * config.vocab_size * n_supervised
    return body + attention + head
