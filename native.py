"""C kernels that PyTorch does not ship (csrc/), compiled on first use with the machine's C
compiler, the one torch.compile already needs on a CPU, and loaded through ctypes.

Each is built for this CPU (-march=native) and kept in a cache folder under a name made of
its source, flags, compiler and CPU, so a change to any of them builds it again and a shared
home folder never hands one machine another's build. GRAFITO_KERNEL_CACHE moves the cache
(default: $XDG_CACHE_HOME/grafito/kernels, or ~/.cache/grafito/kernels); CC picks the compiler.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import GrafitoError

SOURCES = Path(__file__).resolve().parent / "csrc"
# -ffp-contract=off: the kernels fuse multiply-adds only where they say so, so every build rounds alike;
# -fno-math-errno: math functions may be vectorized (nothing reads errno)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]


def cache_folder():
    if os.environ.get("GRAFITO_KERNEL_CACHE"):
        return Path(os.environ["GRAFITO_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grafito" / "kernels"


def cpu_description():
    """What -march=native depends on: the CPU's model and feature flags (Linux), else what Python knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((l for l in lines if l.startswith(k)), "") for k in ("model name", "flags", "Features"))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def compiler():
    """The command that compiles: $CC (which may hold arguments, e.g. "ccache gcc"), else cc, gcc or clang."""
    if os.environ.get("CC"):
        command = shlex.split(os.environ["CC"])
        if command and shutil.which(command[0]):
            return command
        raise GrafitoError(f"CC={os.environ['CC']!r} names no compiler found on this machine: set CC to one (e.g. gcc)")
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not found:
        raise GrafitoError("this option compiles a small C kernel (csrc/) on first use and no C compiler was found: "
                           "install one (e.g. apt-get install gcc) or name it with CC=...")
    return [found]


@functools.cache
def load(name, extra_flags=()):
    """csrc/{name}.c as a ctypes library, built for this machine if its cache lacks it
    (extra_flags: more compiler flags, e.g. a test's build without some instructions)."""
    source = SOURCES / f"{name}.c"
    cc, flags = compiler(), [*FLAGS, *extra_flags]
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256("\0".join([source.read_text(), *flags, version, cpu_description()]).encode()).hexdigest()
        built = cache_folder() / f"{name}-{key[:16]}.so"
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=built.parent, suffix=".so.partial")
            os.close(handle)
            try:
                result = subprocess.run([*cc, *flags, str(source), "-o", partial, "-lm"], capture_output=True,
                                        text=True, timeout=300)
                if result.returncode:
                    raise GrafitoError(f"compiling {source} with {' '.join(cc)} failed:\n{result.stderr[-2000:]}")
                os.replace(partial, built)  # whole or absent: processes building at once each write their own file
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
        return ctypes.CDLL(str(built))
    except (OSError, subprocess.SubprocessError) as err:  # an unwritable or noexec cache folder, a hung compiler
        raise GrafitoError(f"could not build or load the C kernel {name} in {cache_folder()} ({err}): set "
                           f"GRAFITO_KERNEL_CACHE to a writable folder") from err
