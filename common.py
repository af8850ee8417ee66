"""Small helpers shared by every script: the user-facing error, atomic folder writes,
device and precision choices."""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch


THP_SET_BY_GRAFITO = False
_LIBC = None


def keep_cpu_memory():
    """Let freed CPU tensor memory be reused instead of handed back to the OS.

    PyTorch's CPU allocator is plain malloc; glibc serves every block over 32 MB with a
    fresh mmap and unmaps it on free, so each training step's big buffers (weight casts,
    gradients, logits) are page-faulted in and zeroed again (a 124M step on 2 cores: 345.8
    against 413.5 tokens/s, README). With mmap off they stay in the heap, as with a caching
    allocator, and trim_cpu_memory() hands free memory back now and then. Large tensors
    also go on transparent huge pages. Set GRAFITO_SYSTEM_MALLOC=1 to skip both.
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


keep_cpu_memory()


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
    version, which recover_dir() puts back.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        yield tmp
        _share_like_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    shutil.rmtree(old, ignore_errors=True)


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


def recover_dir(final_dir):
    """Finish a swap that atomic_dir() could not complete (writers only: see readable_dir)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if not final_dir.exists() and old.exists():
        os.replace(old, final_dir)


def readable_dir(final_dir):
    """The folder to read for final_dir: itself, or during (or after an interrupted) swap
    the previous version. Readers never rename, so they never undo a writer's swap; a read
    that starts in the instant between its two renames can still miss both, and says so."""
    final_dir = Path(final_dir)
    if not final_dir.name:  # '.', '/': nothing to swap
        return final_dir
    old = final_dir.with_name(final_dir.name + ".old")
    return old if not final_dir.exists() and old.is_dir() else final_dir


def read_text(path, what):
    """A UTF-8 text file's contents, or one clear error naming `what` (e.g. '--start=FILE:x')."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as err:
        raise GrafitoError(f"{what}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise GrafitoError(f"{what}: not UTF-8 text (byte {err.start}: {err.reason})") from None


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
    """The dtype name for a device. 'auto': bfloat16 on the CPU and on GPUs that support it
    (Ampere and newer), float16 on older GPUs. bfloat16 is exact enough everywhere but fast
    only on CPUs with bf16 instructions (AVX-512 BF16, AMX); elsewhere pass float32."""
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16"
    if dtype not in DTYPES:
        raise GrafitoError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise GrafitoError("dtype=float16 needs a CUDA device (it trains with a gradient scaler); "
                           "use bfloat16 or float32 on the CPU")
    return dtype


def autocast(device, dtype):
    """Mixed precision for the forward pass: autocast in bf16/fp16, nothing in fp32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


# Dense tensor-core peaks in FLOP/s: (bf16/fp16, tf32), from the vendors' datasheets (without sparsity).
GPU_PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),  # SXM; NVL and PCIe match the longer names first
    "GH200": (989e12, 494e12),
    "B200": (2250e12, 1100e12),
    "A100": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "A6000": (154.8e12, 77.4e12),
    "V100": (125e12, None),
    "T4": (65e12, None),
}


def peak_flops(device, dtype):
    """The accelerator's peak FLOP/s for this dtype, or None when unknown (CPUs, unlisted GPUs)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, (half, tf32) in GPU_PEAK_FLOPS.items():
        if key in name:
            return half if dtype in ("bfloat16", "float16") else tf32
    return None
