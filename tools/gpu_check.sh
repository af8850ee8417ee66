#!/usr/bin/env bash
# The GPU paths, checked and timed in one run of at most 8 minutes on one H100, ending in one table:
# tests/test_cuda.py, a compiled training step at ruby_002's 2 x 1024 and at 16 x 1024 with MFU, a LoRA
# step, a DPO step, batch-1 decoding with CUDA graphs, and serve.py under 1, 16 and 64 clients.
#
#   bash tools/gpu_check.sh --prepare   # beforehand, beside ../shared with a package registry: fill .gpu_check/
#   bash tools/gpu_check.sh             # on the GPU machine (offline is fine once .gpu_check/ travels with the copy)
#
# --prepare fills the ignored folder .gpu_check/ with what an offline GPU machine lacks: tiktoken/, the GPT-2
# BPE files (from $TIKTOKEN_CACHE_DIR or ../shared/tiktoken), and wheels/, fastapi and uvicorn with their
# dependencies for that machine's Python (GPU_PYTHON_VERSION, default 3.12; x86-64 Linux). Without the BPE
# files the DPO GPU tests and the serve rows are left out; without fastapi the serve rows are, each with a note.
#
# Each step has its own time limit (with the set-up's, they add up to 475 s); each bench row is printed
# the moment it is measured. Results go to $OUT (the device tool's folder) or out/gpu_check: gpu_check.log
# (everything), rows.jsonl (every row), steps.tsv, test_cuda.xml and summary.md (the final table).
# Overrides for a dry run without a GPU: DEVICE=cpu PYTHON=... BENCH_EXTRA="--n_layer=2 ..." (appended to
# every bench.py command).
set -uo pipefail
cd "$(dirname "$0")/.."
cache=.gpu_check
python=${PYTHON:-python3}

if [[ ${1:-} == --prepare ]]; then
  bpe=${TIKTOKEN_CACHE_DIR:-../shared/tiktoken}
  [[ -d $bpe ]] || { echo "error: no BPE files at $bpe: set TIKTOKEN_CACHE_DIR to a tiktoken cache" >&2; exit 2; }
  mkdir -p "$cache/tiktoken" "$cache/wheels"
  cp "$bpe"/* "$cache/tiktoken/"
  # --platform with --only-binary: wheels for the GPU machine, not for this one; pure-Python wheels match any
  "$python" -m pip download --quiet --dest "$cache/wheels" --only-binary=:all: --implementation cp \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    fastapi uvicorn httpx || { echo "error: pip download failed (no package registry?); the serve rows need them" >&2
                               exit 2; }
  echo "filled $cache/: $(ls "$cache/tiktoken" | wc -l) BPE files, $(ls "$cache/wheels" | wc -l) wheels," \
       "$(du -sh "$cache" | cut -f1) in all"
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: bash tools/gpu_check.sh [--prepare]" >&2
  exit 2
fi

device=${DEVICE:-cuda}
read -r -a extra <<< "${BENCH_EXTRA:-}"
out=${OUT:-out/gpu_check}
mkdir -p "$out"
: > "$out/rows.jsonl"
: > "$out/steps.tsv"
export PYTHONUNBUFFERED=1

step() {  # name, seconds allowed, note, command...: runs it under its limit, records how it ended
  local name=$1 limit=$2 note=$3 start=$SECONDS rc status
  shift 3
  echo "== $name (at most $limit s): $*"
  printf '{"step": "%s"}\n' "$name" >> "$out/rows.jsonl"
  # SIGINT, to the step's whole process group: bench.py stops its servers, pytest reports what ran
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="stopped at its $limit s limit" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$note" >> "$out/steps.tsv"
}

skip() {  # name, why
  echo "== $1: left out: $2"
  printf '%s\t%s\t0\t\n' "$1" "left out: $2" >> "$out/steps.tsv"
}

run_steps() {
  # Set-up: the machine, the BPE files, the serve packages (at most 50 s).
  if [[ $device == cuda* ]]; then timeout 5 nvidia-smi; fi
  if [[ -z ${TIKTOKEN_CACHE_DIR:-} && -d $cache/tiktoken ]]; then
    export TIKTOKEN_CACHE_DIR=$PWD/$cache/tiktoken
  elif [[ -z ${TIKTOKEN_CACHE_DIR:-} && -d ../shared/tiktoken ]]; then
    export TIKTOKEN_CACHE_DIR=$(cd ../shared/tiktoken && pwd)
  fi
  echo "TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-(unset)}"
  timeout 10 "$python" -c "import tokenizer; tokenizer.get_encoding()" >/dev/null 2>&1 && have_bpe=1 || have_bpe=0
  if ! "$python" -c "import fastapi, uvicorn, httpx" 2>/dev/null && [[ -d $cache/wheels ]]; then
    timeout 20 "$python" -m pip install --quiet --no-index --find-links "$cache/wheels" fastapi uvicorn httpx
  fi
  "$python" -c "import fastapi, uvicorn, httpx" 2>/dev/null && have_serve=1 || have_serve=0
  capability=$(timeout 15 "$python" -c "import torch; print(*torch.cuda.get_device_capability(), sep='.')" 2>/dev/null \
               || echo unknown)
  echo "BPE files: $have_bpe, serve packages: $have_serve, compute capability: $capability"

  # test_cuda.py skips, with the reason, what this GPU or machine lacks (bf16 and flash below 8.0, the BPE files)
  step tests 145 "skips: see test_cuda.txt" "$python" -m pytest -q -rs -p no:cacheprovider \
    --junit-xml="$out/test_cuda.xml" tests/test_cuda.py

  bench=("$python" bench.py --device="$device" --dtype=auto --jsonl="$out/rows.jsonl")
  step train 120 "compiled" "${bench[@]}" --compile --model=gpt2 --batch_size=16 --block_size=1024 --repeats=10 \
    --rows=train,masked,lora,configs --configs=ruby_002 "${extra[@]}"
  step decode 40 "compiled: CUDA graphs" "${bench[@]}" --compile --model=gpt2 --rows=decode --decode_batch=1 \
    "${extra[@]}"
  step dpo 60 "compiled" "${bench[@]}" --compile --model=gpt2 --rows=dpo --batch_size=8 --block_size=512 "${extra[@]}"
  if (( ! have_bpe )); then
    skip serve "no GPT-2 BPE files (tools/gpu_check.sh --prepare fills .gpu_check/tiktoken)"
  elif (( ! have_serve )); then
    skip serve "no fastapi/uvicorn/httpx (tools/gpu_check.sh --prepare fills .gpu_check/wheels)"
  else
    step serve 60 "eager" "${bench[@]}" --model=gpt2 --rows=serve --serve_clients=1,16,64 --serve_requests=64 \
      --serve_tokens=32 "${extra[@]}"
  fi
}

run_steps 2>&1 | tee "$out/gpu_check.log"

# One table: every step's status and every row that finished, from steps.tsv and rows.jsonl.
"$python" - "$out" <<'EOF' | tee "$out/summary.md" | tee -a "$out/gpu_check.log"
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

out = Path(sys.argv[1])
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
rows, headers, step = {}, {}, None
for line in (out / "rows.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "step" in record:
        step = record["step"]
    elif "header" in record:
        headers[step] = record["header"]
    else:
        rows.setdefault(step, []).append(record)


def cell(value, spec):
    return format(value, spec) if value is not None else ""


def tests_result():
    try:
        suite = ElementTree.parse(out / "test_cuda.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return "no report"
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    text = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    return text + (f" (failed: {', '.join(failed)})" if failed else "")


print(f"\n# gpu_check: {next(iter(headers.values()), 'no bench header')}\n")
print("| step | row | impl | batch | tokens/s | ms per step (per token for decode) | MFU | peak memory MB | note |")
print("|---|---|---|---|---:|---:|---:|---:|---|")
for name, status, seconds, note in steps:
    result = tests_result() if name == "tests" else f"{len(rows.get(name, []))} rows"
    notes = "; ".join(filter(None, [status, f"{seconds} s", note]))
    print(f"| {name} | {result} | | | | | | | {notes} |")
    for r in rows.get(name, []):
        note = (f"first token p50 {r['ttft_p50_s']:.3f} s, p95 {r['ttft_p95_s']:.3f} s" if "ttft_p50_s" in r
                else f"step time {r['dpo_cost_vs_sft']:.2f}x SFT's" if "dpo_cost_vs_sft" in r else "")
        print(f"| {name} | {r['row']} | {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.1f} "
              f"| {cell(r.get('step_ms'), ',.2f')} | {cell(r.get('mfu'), '.1%')} | {cell(r.get('memory_mb'), ',.0f')} "
              f"| {note} |")
EOF
echo "results in $out"
