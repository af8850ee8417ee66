"""bench.py smoke test: a tiny shape, every row, transformers beside it; the JSON line holds every field."""

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_runs_and_reports_every_field(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
         "--batch_size=2", "--repeats=2", "--warmup=1", "--prompt_tokens=8", "--decode_tokens=6", "--decode_batch=2",
         "--lora_r=4", "--compare=hf", "--dtype=float32", f"--dataset={tmp_path / 'none'}",
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
    lora_row = next(r for r in report["rows"] if r["row"] == "train LoRA, masked SFT")
    assert lora_row["ratio_vs_full"] > 0
    assert "synthetic, 40% supervised" in next(r["batch"] for r in report["rows"] if r["row"] == "train full, masked SFT")
    assert "| train full, plain LM | grafito |" in result.stdout
