"""bench.py smoke tests: a tiny shape, every row, transformers beside it; the JSON line holds every
field; each row is reported the moment it is measured, so a run stopped early keeps its rows."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=2", "--repeats=2", "--warmup=1",
        "--dtype=float32", "--device=cpu"]


def test_bench_runs_and_reports_every_field(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), *TINY, "--prompt_tokens=8", "--decode_tokens=6", "--decode_batch=2",
         "--lora_r=4", "--compare=hf", f"--dataset={tmp_path / 'none'}",
         "--rows=train,masked,lora,decode,configs", "--configs=ruby_002,lazuli_001"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("config", "device", "machine", "torch", "dtype", "peak_flops", "peak_source", "rows"):
        assert key in report, key
    assert report["peak_flops"] > 0 and report["dtype"] == "float32"
    names = {(r["row"], r["impl"]) for r in report["rows"]}
    for row in ("train full, plain LM", "train full, masked SFT", "prefill, batch 1", "decode, batch 1",
                "prefill, batch 2", "decode, batch 2"):
        assert (row, "grafito") in names and (row, "transformers") in names, row
    assert ("train LoRA, masked SFT", "grafito") in names
    assert ("ruby_002", "grafito") in names and ("ruby_002", "transformers") in names
    assert next(r["batch"] for r in report["rows"] if r["row"] == "ruby_002").startswith("2x1024, dropout 0.1")
    assert ("lazuli_001 LoRA", "grafito") in names and ("lazuli_001 as full", "grafito") in names
    for r in report["rows"]:
        for key in ("row", "impl", "batch", "tokens_per_s", "step_ms", "mfu", "memory_mb"):
            assert key in r, (r["row"], key)
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        if r["impl"] == "grafito" and "LoRA" not in r["row"] and "as full" not in r["row"]:
            assert r["ratio_vs_transformers"] > 0
        assert f"row: {r['row']} | {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.1f} tokens/s" in result.stderr
    lora_row = next(r for r in report["rows"] if r["row"] == "train LoRA, masked SFT")
    assert lora_row["ratio_vs_full"] > 0
    assert "synthetic, 40% supervised" in next(r["batch"] for r in report["rows"] if r["row"] == "train full, masked SFT")
    assert "| train full, plain LM | grafito |" in result.stdout


def test_a_run_stopped_after_its_first_row_has_reported_that_row(tmp_path):
    """The process is killed (as a time limit kills it) when the second row starts: the first row's
    figures are on stderr and in the --jsonl file, and no final table was printed."""
    jsonl = tmp_path / "rows.jsonl"
    argv = ["bench.py", *TINY, f"--dataset={tmp_path / 'none'}", "--rows=train,masked", f"--jsonl={jsonl}"]
    stop_at_the_second_row = f"""
import os, signal, sys
import bench
measure, started = bench.training_row, []
def training_row(*args, **kwargs):
    if started:
        os.kill(os.getpid(), signal.SIGKILL)
    started.append(True)
    return measure(*args, **kwargs)
bench.training_row = training_row
sys.argv = {argv!r}
bench.run_cli(bench.main)
"""
    result = subprocess.run([sys.executable, "-c", stop_at_the_second_row], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == -9, result.stderr[-3000:]
    assert re.search(r"^row: train full, plain LM \| grafito \| 2x64, all supervised \| [\d,.]+ tokens/s, "
                     r"[\d,.]+ ms/step, MFU [\d.]+%", result.stderr, re.M), result.stderr[-3000:]
    assert "masked SFT |" not in result.stderr and "| row | impl |" not in result.stdout
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines[0]["header"].startswith("grafito bench: gpt2 shape") and lines[0]["dtype"] == "float32"
    assert [(r["row"], r["impl"]) for r in lines[1:]] == [("train full, plain LM", "grafito")]
    assert lines[1]["tokens_per_s"] > 0 and lines[1]["mfu"] > 0


def test_llamacpp_rows_sit_beside_grafito_s_bf16_and_8_bit_rows_with_the_bandwidth_they_reach():
    pytest.importorskip("llama_cpp")  # an optional benchmark dependency
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), *TINY[:-2], "--dtype=bfloat16", "--device=cpu", "--rows=decode",
         "--prompt_tokens=8", "--decode_tokens=6", "--decode_batch=2", "--compare=llamacpp", "--quantize=int8,w8a8"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["copy_gb_s"] > 0
    rows = {(r["row"], r["impl"]): r for r in report["rows"]}
    for impl in ("grafito", "grafito int8", "grafito w8a8", "llama.cpp f16", "llama.cpp q8_0"):
        assert rows[("decode, batch 1", impl)]["weights_gb_s"] > 0, impl
    assert ("decode, batch 2", "grafito int8") in rows and ("decode, batch 2", "llama.cpp f16") not in rows  # batch 1 only
    c, vocab = 64, 50257  # the four matrices of 2 layers and the tied output layer
    matrices = 2 * 12 * c * c + vocab * c
    f16 = rows[("decode, batch 1", "llama.cpp f16")]
    assert f16["weights_gb_s"] == pytest.approx(2 * matrices * f16["tokens_per_s"] / 1e9)
    ours = rows[("decode, batch 1", "grafito")]
    assert ours["ratio_vs_llama.cpp f16"] == pytest.approx(ours["tokens_per_s"] / f16["tokens_per_s"])
    for method in ("int8", "w8a8"):
        quantized = rows[("decode, batch 1", f"grafito {method}")]
        assert quantized["weights_gb_s"] / quantized["tokens_per_s"] < 0.6 * ours["weights_gb_s"] / ours["tokens_per_s"]


def test_without_llama_cpp_its_rows_are_left_out_with_a_note():
    argv = ["bench.py", *TINY, "--rows=decode", "--prompt_tokens=4", "--decode_tokens=3", "--decode_batch=1",
            "--compare=llamacpp"]
    without = f"""
import sys

import pytest
import benchmarks.llamacpp_peer as peer
peer.available = lambda: False
import bench
sys.argv = {argv!r}
bench.run_cli(bench.main)
"""
    result = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("no llama.cpp rows: llama_cpp is not importable") == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {r["impl"] for r in report["rows"]} == {"grafito"}
