"""native.py: a C kernel is built once per source, flags, compiler and CPU, kept in its cache, and a
compiler's failure or an unwritable cache is one clear error."""

import pytest

import engine
import native
from common import GrafitoError


@pytest.fixture
def logged_compiler(tmp_path, monkeypatch):
    """CC: a wrapper around the real compiler that logs each build (and fails where told to)."""
    log, wrapper = tmp_path / "builds.log", tmp_path / "cc"
    real = " ".join(native.compiler())
    wrapper.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then exec {real} --version; fi
echo build >> {log}
if [ -e {tmp_path}/fail ]; then echo "error: no such instruction" >&2; exit 1; fi
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", f"sh {wrapper}")  # a command with an argument, as "ccache gcc" is
    monkeypatch.setenv("GRAFITO_KERNEL_CACHE", str(tmp_path / "kernels"))
    native.load.cache_clear()
    yield lambda: len(log.read_text().splitlines()) if log.exists() else 0
    native.load.cache_clear()


def test_a_kernel_is_built_once_and_again_when_its_flags_change(logged_compiler, tmp_path):
    library = native.load("w8a8_linear")
    assert logged_compiler() == 1 and library.w8a8_vectorized() in (0, 1)
    native.load.cache_clear()  # a new process: the cache folder's build is loaded, not rebuilt
    native.load("w8a8_linear")
    assert logged_compiler() == 1
    native.load("w8a8_linear", ("-DUNUSED_SETTING=1",))
    assert logged_compiler() == 2
    built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len(built) == 2 and all(name.startswith("w8a8_linear-") and name.endswith(".so") for name in built)


def test_an_unwritable_cache_is_one_clear_error_and_decode_attention_falls_back(monkeypatch):
    monkeypatch.setenv("GRAFITO_KERNEL_CACHE", "/proc/grafito-kernels")  # not writable, even by root
    native.load.cache_clear()
    engine.decode_attention_kernel.cache_clear()
    try:
        with pytest.raises(GrafitoError, match="could not build or load the C kernel w8a8_linear in /proc/grafito-kernels"
                                               ".*set GRAFITO_KERNEL_CACHE to a writable folder"):
            native.load("w8a8_linear")
        assert engine.decode_attention_kernel() is None  # generation goes on through PyTorch's attention
    finally:
        native.load.cache_clear()
        engine.decode_attention_kernel.cache_clear()


def test_a_failed_build_is_one_clear_error_and_leaves_nothing_behind(logged_compiler, tmp_path):
    (tmp_path / "fail").touch()
    with pytest.raises(GrafitoError, match="compiling .*w8a8_linear.c with .* failed:\nerror: no such instruction"):
        native.load("w8a8_linear")
    assert list((tmp_path / "kernels").iterdir()) == []
