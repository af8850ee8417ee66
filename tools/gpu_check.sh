#!/usr/bin/env bash
# The GPU paths, checked and timed in one run of at most 8 minutes (tests 180 s, four benchmarks 70 s each):
# tests/test_cuda.py, then bench.py at block 1024 for 124M and 355M (training steps with MFU, LoRA, decoding
# at batch 1 and 8) and the DPO rows at obsidian_000_dpo's batch.
# Results go to $OUT (the device tool's folder) or ./gpu_check. Offline, point TIKTOKEN_CACHE_DIR at the
# GPT-2 BPE files if the tests that read real data should run (they skip otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$out/machine.txt" 2>&1
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
bench() {  # name, then bench.py options
  local name=$1; shift
  timeout 70 python3 bench.py --device=cuda --dtype=bfloat16 --compile --block_size=1024 --repeats=10 "$@" 2>&1 \
    | tee "$out/bench_$name.txt"
}
bench 124m --model=gpt2 --batch_size=16 --rows=train,masked,lora
bench 355m --model=gpt2-medium --batch_size=8 --rows=train,masked,lora
bench decode_124m --model=gpt2 --rows=decode --decode_batch=8
bench dpo_124m --model=gpt2 --rows=dpo --batch_size=8 --block_size=512
echo "results in $out"
