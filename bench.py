"""How fast grafito trains and generates on this machine, optionally beside another implementation.

    python bench.py                                  # gpt2 (124M) shape, random weights, no download
    python bench.py --compare=hf                     # the same shapes through transformers, interleaved
    python bench.py --model=gpt2-medium --compile --device=cuda
    python bench.py --rows=serve --compare=hf        # serve.py under 1, 4, 16 clients, beside transformers serve
    python bench.py --rows=dpo --compare=trl --batch_size=8 --block_size=512   # DPO steps at obsidian_000_dpo's batch

Rows: a full fine-tuning step on plain LM batches (every token supervised) and on masked
SFT batches (real prepared data when data/<dataset> exists, else a synthetic mask with the
given supervised fraction), a LoRA step on the masked batches, and generation at batch 1 and
batch N: "prefill" is the time to the first new token (the prompt's forward pass and one
step), "decode" the KV-cache steps after it. Each row: warm-up steps excluded, `repeats` timed runs
(ours and the peer's alternating), the median reported, GPU timings synchronised.
Step memory is the process's peak during a row, everything resident included (weights,
optimizer state, activations): the peak RSS on Linux CPUs (reset to the current RSS
before each row), max allocated on GPUs.
MFU divides the FLOPs each implementation performs (common.training_flops: a peer computes
logits at every position, grafito only where the loss is taken) by the peak of the device:
the datasheet table for GPUs, or on CPUs a bf16/fp32 matmul peak measured here first.
--rows=configs: training steps at each codename config's own batch, block, dropout and LoRA
settings. --rows=dpo: a DPO step (LoRA: the reference is a forward pass with the adapters off;
full: stored reference log-probabilities, as train.py takes them) against an SFT step on the
same rows, batch_size pairs of pairs_dataset's train split (two rows each, grouped by length
as train.py groups them), or synthetic pairs. --rows=serve: serve.py under N concurrent
streaming clients (benchmarks/serve_load.py).

--compare picks the peer timed beside grafito (benchmarks.PEERS): 'hf' is transformers
(training steps with AdamW's defaults, generation, `transformers serve` in the serve rows), 'trl'
TRL's DPOTrainer in the dpo rows, with a check that its loss on the batch equals grafito's.

Each row is reported on stderr (and appended to --jsonl) the moment it is measured, so a run
stopped by a time limit keeps its finished rows; the tables follow at the end, and the last
line of output is one JSON object with every number.
"""

import dataclasses
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

import data
import dpo
import engine
import lora
import quantize
import tokenizer
from benchmarks import PEERS
from benchmarks.measure import (RowReport, StepClock, StepTimer, interleaved, measured_copy_bandwidth, measured_peak,
                                peak_memory_mb, reset_peak_memory, timed)
from benchmarks.serve_load import print_serve_table, serve_rows, with_serve_ratios
from common import DTYPES, GrafitoError, autocast, run_cli, setup, training_flops
from configurator import SEED, check_options, integer, load_config, number, one_of
from loss import AnswerLogProbs
from model import GPT, PRESETS, GPTConfig
from optim import make_optimizer
from train import load_train_config  # the codename configs exactly as train.py resolves them


DEFAULTS = dict(
    model="gpt2",  # a GPT-2 shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl (random weights)
    n_layer=0,  # > 0 overrides the preset (tiny shapes for smoke tests)
    n_head=0,
    n_embd=0,
    batch_size=4,
    block_size=256,
    dtype="auto",  # auto (bf16 on CPUs and Ampere+ GPUs, fp16 on older GPUs) | bfloat16 | float32 | float16
    compile=False,
    supervised=0.4,  # supervised share of the synthetic masked batches
    dataset="grafito25k",  # masked batches from this prepared dataset when it exists
    pairs_dataset="hh_rlhf_pairs",  # dpo rows: pair batches from this prepared pairs dataset when it exists
    beta=0.1,  # dpo rows
    lora_r=16,
    repeats=5,
    warmup=2,
    prompt_tokens=128,  # prefill length
    decode_tokens=128,  # new tokens per decode run
    decode_batch=8,  # the "batch N" decode row
    rows="train,masked,lora,decode",  # which rows to run; also (not by default) configs, serve, dpo
    configs="ruby_002,obsidian_000,lazuli_001",  # rows=configs: the codename configs' own shapes
    compare="",  # the peer timed beside grafito: hf (transformers; serve: transformers serve) | trl (dpo rows) | llamacpp
    quantize="",  # int8, w8a8 or both (int8,w8a8): decode rows for grafito with 8-bit weights too (quantize.py; CPUs)
    serve_clients="1,4,16",  # the serve rows: concurrent streaming clients (1 = the requests one at a time)
    serve_requests=16,  # requests per serve row, shared among its clients
    serve_tokens=48,  # new tokens each request asks for (greedy)
    jsonl="",  # append each row to this file as one JSON line the moment it is measured
    device="auto",
    seed=1337,
)
ROWS = ("train", "masked", "lora", "decode", "configs", "serve", "dpo")
RULES = {
    "model": one_of(*PRESETS), "compare": one_of("", *PEERS), "n_layer": integer(0, 4096), "n_head": integer(0, 4096),
    "n_embd": integer(0, 1 << 16), "batch_size": integer(1, 4096), "block_size": integer(1, 1 << 16),
    "supervised": number(0.0, 1.0), "lora_r": integer(1, 4096), "repeats": integer(1, 1000), "warmup": integer(0, 1000),
    "prompt_tokens": integer(1, 1 << 16), "decode_tokens": integer(2, 1 << 16),  # decode: the tokens after the first
    "decode_batch": integer(1, 4096), "seed": SEED, "serve_requests": integer(1, 1 << 16),
    "serve_tokens": integer(1, 1 << 16),
    "quantize": (lambda v: not v or all(m in quantize.CHOICES[1:] for m in v.split(",")),
                 f"'' or a comma list of {', '.join(quantize.CHOICES[1:])}"),
}


# ----------------------------------------------------------------------------- training steps

def masked_batch(dataset, B, T, config, rng):
    """(x, y, source): B rows of T tokens packed from a prepared dataset when present, else synthetic."""
    try:
        split = data.load_split(dataset, "train")
        batches = data.PackedBatches(split, T, seed=config["seed"])
        x, y = batches.batch(batches.next_rows(B))
        return x, y, f"{dataset} (real, {float((y >= 0).mean()):.0%} supervised)"
    except GrafitoError:
        x = rng.integers(0, tokenizer.VOCAB_SIZE, (B, T))
        y = np.where(rng.random((B, T)) < config["supervised"], rng.integers(0, tokenizer.VOCAB_SIZE, (B, T)), -1)
        return x, y, f"synthetic, {config['supervised']:.0%} supervised"


def our_trainer(gpt_config, device, dtype, compile_model, lora_config=None):
    """A GPT set up as train.py sets it up: its optimizer; LoRA with frozen matrices in the autocast dtype."""
    torch.manual_seed(0)
    model = GPT(gpt_config)
    if lora_config is not None:
        lora.apply_lora(model, lora_config)
        if dtype in ("bfloat16", "float16"):
            lora.cast_frozen_linears(model, DTYPES[dtype])
    model.to(device)
    return StepTimer(model, make_optimizer(model, 1e-5, 0.1, (0.9, 0.95), device), device, dtype, compile_model)


def training_row(name, note, x, y, ours, gpt_config, config, device, peak, peer=None, lora_row=False):
    """Row dicts for one training step timed on batch (x, y): ours, and the peer's when it has one."""
    B, T = x.shape
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    positions = torch.from_numpy(np.flatnonzero(y >= 0)).to(device)
    timers = [("grafito", lambda: timed(lambda: ours.step(idx=xt, targets=yt, supervised=positions), device))]
    theirs = peer.train_timer(name, x, y, gpt_config.dropout) if peer is not None else None
    if theirs is not None:
        timers.append((peer.name, theirs))
        peer.reset_memory()
    reset_peak_memory(device)
    times = interleaved(timers, config["repeats"], config["warmup"])
    memory = {"grafito": peak_memory_mb(device)}
    if theirs is not None:
        memory[peer.name] = peer.memory_mb()
    rows = []
    for who, seconds in times.items():
        median = statistics.median(seconds)
        supervised = int((y >= 0).sum()) if who == "grafito" else B * T  # a peer computes logits everywhere
        flops = training_flops(gpt_config, B * T, supervised, T, lora=lora_row)
        rows.append({"row": name, "impl": who, "batch": note, "tokens_per_s": B * T / median, "step_ms": median * 1e3,
                     "mfu": flops / median / peak, "memory_mb": memory[who],
                     "times_ms": [round(t * 1e3, 1) for t in seconds]})
    return rows


def train_rows(config, gpt_config, device, dtype, peak, rng, peer):
    """The default shape: full steps on plain LM and masked SFT batches, and a LoRA step."""
    B, T = config["batch_size"], config["block_size"]
    wanted = config["rows"].split(",")
    x_plain = rng.integers(0, tokenizer.VOCAB_SIZE, (B, T))
    y_plain = rng.integers(0, tokenizer.VOCAB_SIZE, (B, T))
    x_masked, y_masked, source = masked_batch(config["dataset"], B, T, config, rng)
    timing = dict(gpt_config=gpt_config, config=config, device=device, peak=peak)
    if "train" in wanted or "masked" in wanted:
        ours = our_trainer(gpt_config, device, dtype, config["compile"])
        if "train" in wanted:
            yield from training_row("train full, plain LM", f"{B}x{T}, all supervised", x_plain, y_plain, ours,
                                    peer=peer, **timing)
        if "masked" in wanted:
            yield from training_row("train full, masked SFT", f"{B}x{T}, {source}", x_masked, y_masked, ours,
                                    peer=peer, **timing)
        del ours
    if "lora" in wanted:
        ours = our_trainer(gpt_config, device, dtype, config["compile"], lora.LoRAConfig(r=config["lora_r"]))
        yield from training_row("train LoRA, masked SFT", f"{B}x{T}, r={config['lora_r']} q,v", x_masked, y_masked,
                                ours, lora_row=True, **timing)


def codename_rows(config, gpt_config, device, dtype, peak, rng, peer):
    """Training steps at each codename config's own batch x block, dropout and LoRA settings
    (on the --model shape: a CPU cannot time gpt2-xl), beside the peer's at the same settings;
    a LoRA config also gets our full step at its shape, for the ratio."""
    for name in filter(None, config["configs"].split(",")):
        path = Path(__file__).resolve().parent / "config" / f"{name}.py"
        if not path.is_file():
            raise GrafitoError(f"--configs: no config/{name}.py")
        run = load_train_config([str(path)])
        B, T = run["batch_size"], run["block_size"]
        shape = dataclasses.replace(gpt_config, dropout=run["dropout"], block_size=max(gpt_config.block_size, T))
        x, y, source = masked_batch(run["dataset"], B, T, config, rng)
        timing = dict(gpt_config=shape, config=config, device=device, peak=peak)
        note = f"{B}x{T}, dropout {run['dropout']}, {source}"
        if run["lora_r"]:
            targets = tuple(t.strip() for t in run["lora_targets"].split(","))
            adapters = lora.LoRAConfig(r=run["lora_r"], alpha=run["lora_alpha"], dropout=run["lora_dropout"], targets=targets)
            ours = our_trainer(shape, device, dtype, config["compile"], adapters)
            yield from training_row(f"{name} LoRA", note, x, y, ours, lora_row=True, **timing)
            del ours
            yield from training_row(f"{name} as full", note, x, y, our_trainer(shape, device, dtype, config["compile"]),
                                    **timing)
        else:
            yield from training_row(name, note, x, y, our_trainer(shape, device, dtype, config["compile"]), peer=peer,
                                    **timing)


def pair_batch(config, rng):
    """(x, y, source): batch_size pairs, chosen rows then rejected rows, from pairs_dataset's
    train split grouped by length as train.py groups them (a batch from the middle of a group,
    not its longest), else synthetic pairs of about hh-rlhf's shape (28% supervised)."""
    B, T = config["batch_size"], config["block_size"]
    try:
        split = data.load_pairs(config["pairs_dataset"], "train")
        batches = data.PairBatches(split, T, seed=config["seed"], length_group=dpo.PAIR_LENGTH_GROUP)
        batches.next_pairs(dpo.PAIR_LENGTH_GROUP // 2 // B * B)
        x, y = batches.batch(batches.next_pairs(B))
        source = f"{config['pairs_dataset']} (real, {float((x != tokenizer.EOT).mean()):.0%} real tokens"
    except GrafitoError:  # absent, or holding pairs longer than block_size
        tokens, supervised = np.full((2 * B, T + 1), tokenizer.EOT), np.zeros((2 * B, T + 1), dtype=bool)
        for i in range(B):
            prompt = rng.integers(0, tokenizer.VOCAB_SIZE, rng.integers(T // 4, T // 2))
            for row in (i, B + i):
                answer = rng.integers(0, tokenizer.VOCAB_SIZE, rng.integers(T // 16, T // 4))
                end = len(prompt) + len(answer) + 1
                tokens[row, :end] = np.concatenate([prompt, answer, [tokenizer.EOT]])
                supervised[row, len(prompt):end] = True
        x, y = tokens[:, :-1], np.where(supervised[:, 1:], tokens[:, 1:], -1)
        source = "synthetic (random tokens"
    return x, y, f"{B} pairs = {2 * B}x{x.shape[1]}, {source}, {float((y >= 0).mean()):.0%} supervised)"


def dpo_rows(config, gpt_config, device, dtype, x, y, batch_note, peer):
    """A DPO step against an SFT step on the same rows of pair batch (x, y), LoRA and full; the
    peer's DPO step beside them."""
    B, n_tokens = config["batch_size"], x.size
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    supervised = torch.from_numpy(np.flatnonzero(y >= 0)).to(device)
    for kind in ("LoRA", "full"):
        adapters = lora.LoRAConfig(r=config["lora_r"]) if kind == "LoRA" else None
        trainer = our_trainer(gpt_config, device, dtype, config["compile"], adapters)
        model, policy = trainer.model, AnswerLogProbs(trainer.model)
        policy = torch.compile(policy) if config["compile"] else policy
        with torch.no_grad(), autocast(device, dtype):  # a stored reference is read; making it is not timed
            by_row = policy(xt, yt, supervised)
        stored = dpo.Reference(model, policy, device, dtype, {"train": torch.stack([by_row[:B], by_row[B:]], dim=1)})
        references = {"DPO": dpo.Reference(model, policy, device, dtype) if kind == "LoRA" else stored}
        if kind == "LoRA":
            references["DPO, stored reference"] = stored
        pairs = np.arange(B)

        def dpo_step(reference):
            with autocast(device, dtype):
                loss_sum, _ = dpo.step_loss(policy(xt, yt, supervised), reference.rows(pairs, xt, yt, supervised),
                                            config["beta"], 0.0)
            trainer.finish(loss_sum / B)

        def sft_step():
            with autocast(device, dtype):
                _, loss_sum = model(xt, yt, reduction="sum", supervised=supervised)
            trainer.finish(loss_sum / len(supervised))

        timers = [(f"grafito {label}", lambda reference=reference: timed(lambda: dpo_step(reference), device))
                  for label, reference in references.items()] + [("grafito SFT", lambda: timed(sft_step, device))]
        theirs = peer.dpo_timer(kind, x, y, config["beta"], config["lora_r"]) if peer is not None else None
        if theirs is not None:
            timers.append((f"{peer.name} DPO", theirs))
        reset_peak_memory(device)
        times = interleaved(timers, config["repeats"], config["warmup"])
        memory = peak_memory_mb(device)
        median = {name: statistics.median(seconds) for name, seconds in times.items()}
        for name, seconds in times.items():
            who, label = name.split(" ", 1)
            row = {"row": f"train {kind}, {'SFT on the same rows' if label == 'SFT' else label}", "impl": who,
                   "batch": batch_note, "tokens_per_s": n_tokens / median[name], "step_ms": median[name] * 1e3,
                   "mfu": None, "memory_mb": memory if who == "grafito" else None,
                   "times_ms": [round(t * 1e3, 1) for t in seconds]}
            if name.startswith("grafito DPO"):
                row["dpo_cost_vs_sft"] = median[name] / median["grafito SFT"]
            yield row
        trainer = model = policy = stored = references = None  # free this kind's model before the next


# ----------------------------------------------------------------------------- generation

def decode_rows(config, gpt_config, device, dtype, peer, copy_bandwidth):
    """Prefill and decode rows at batch 1 and N: grafito in its dtype, also with --quantize's
    weights, and the peer's ways of running. A decode row's weights_gb_s is the bytes of the
    weight matrices a step reads times steps per second, beside the machine's copy bandwidth."""
    engines = {}
    methods = [m for m in config["quantize"].split(",") if m]
    for impl, method in [("grafito", "")] + [(f"grafito {m}", m) for m in methods]:
        torch.manual_seed(0)
        model = quantize.quantize(GPT(gpt_config).eval(), method, DTYPES[dtype])
        engines[impl] = engine.Engine(model.to(device=device, dtype=DTYPES[dtype]), compile=config["compile"])
    P, N = config["prompt_tokens"], config["decode_tokens"]
    if P + N > gpt_config.block_size:
        raise GrafitoError(f"prompt_tokens + decode_tokens = {P + N} exceed block_size {gpt_config.block_size}")
    greedy = engine.Sampling(temperature=0)

    def ours_generate(ours, prompts):
        clock = StepClock(device)
        clock.put(prompts)  # as transformers' streamer is given the prompt first
        for _ in ours.generate(prompts, N, greedy):
            clock.put(None)
        return clock.first_token_and_decode()

    weight_bytes = {impl: decode_weight_bytes(ours.model) for impl, ours in engines.items()}
    for batch in sorted({1, config["decode_batch"]}):
        prompts = torch.randint(0, tokenizer.VOCAB_SIZE, (batch, P)).tolist()
        timers = [(impl, lambda ours=ours, prompts=prompts: ours_generate(ours, prompts)) for impl, ours in engines.items()]
        theirs = peer.generate_timers(f"generate {batch}", prompts, N) if peer is not None else []
        timers += theirs
        if theirs:
            peer.reset_memory()
        reset_peak_memory(device)
        times = interleaved(timers, config["repeats"], 1)
        memory = {impl: peak_memory_mb(device) for impl in engines}  # one process: the largest of them
        memory.update({impl: peer.memory_mb(impl) for impl, _ in theirs})
        weight_bytes.update({impl: peer.decode_weight_bytes(impl) for impl, _ in theirs})
        for who in memory:
            first = statistics.median(t[0] for t in times[who])
            decode = statistics.median(t[1] for t in times[who])
            steps_per_s = (N - 1) / decode
            weights_gb_s = weight_bytes[who] * steps_per_s / 1e9 if weight_bytes[who] else None
            yield {"row": f"prefill, batch {batch}", "impl": who, "batch": f"{batch}x{P} prompt",
                   "tokens_per_s": batch * P / first, "step_ms": first * 1e3, "mfu": None, "memory_mb": memory[who]}
            yield {"row": f"decode, batch {batch}", "impl": who, "batch": f"{batch}x{N - 1} new tokens",
                   "tokens_per_s": batch * steps_per_s, "step_ms": 1e3 / steps_per_s, "mfu": None,
                   "memory_mb": memory[who], "weights_gb_s": weights_gb_s,
                   "of_copy_bandwidth": weights_gb_s / copy_bandwidth if weights_gb_s else None}


def decode_weight_bytes(model):
    """Bytes of the weight matrices one decode step reads: every linear layer's (the tied output
    layer once); the embeddings are looked up, one row each."""
    total = 0
    for module in model.modules():
        if isinstance(module, quantize.Int8Linear):
            total += module.weight_int8.nbytes + module.scales.nbytes
        elif isinstance(module, quantize.W8A8Linear):
            total += module.weight_uint8.nbytes + module.scales.nbytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.nbytes
    return total


# ----------------------------------------------------------------------------- the report

def with_ratios(rows):
    """Ours over the peer's on every row that has both, and LoRA over our full masked step."""
    by_key = {(r["row"], r["impl"]): r for r in rows}
    for r in rows:
        if r["impl"].startswith("grafito"):
            for other in rows:
                if other["row"] == r["row"] and not other["impl"].startswith("grafito"):
                    r[f"ratio_vs_{other['impl']}"] = r["tokens_per_s"] / other["tokens_per_s"]
    pairs = [("train LoRA, masked SFT", "train full, masked SFT")]
    pairs += [(r["row"], r["row"].replace(" LoRA", " as full")) for r in rows if r["row"].endswith(" LoRA")]
    for lora_name, full_name in pairs:
        lora_row, full_row = by_key.get((lora_name, "grafito")), by_key.get((full_name, "grafito"))
        if lora_row and full_row:
            lora_row["ratio_vs_full"] = lora_row["tokens_per_s"] / full_row["tokens_per_s"]
    return rows


def print_table(rows, header):
    print(header)
    bandwidth = any(r.get("weights_gb_s") for r in rows)
    print("| row | impl | batch | tokens/s | ms/step (per token for decode) | MFU | ours/peer | peak memory MB |"
          + " weights read GB/s (of copy) |" * bandwidth)
    print("|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * bandwidth)
    for r in rows:
        peers = [k for k in r if k.startswith("ratio_vs_") and k != "ratio_vs_full"]
        ratios = [f"{r[k]:.2f}x" + (f" {k[len('ratio_vs_'):]}" if len(peers) > 1 else "") for k in peers]
        ratios += [f"{r['ratio_vs_full']:.2f}x our full step"] if r.get("ratio_vs_full") else []
        ratios += [f"step time {r['dpo_cost_vs_sft']:.2f}x SFT's"] if r.get("dpo_cost_vs_sft") else []
        ratio = "; ".join(ratios)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else ""
        memory = f"{r['memory_mb']:,.0f}" if r["memory_mb"] is not None else ""
        reads = f"{r['weights_gb_s']:,.1f} ({r['of_copy_bandwidth']:.0%})" if r.get("weights_gb_s") else ""
        print(f"| {r['row']} | {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {r['step_ms']:,.1f} | {mfu} | {ratio} | {memory} |"
              + f" {reads} |" * bandwidth)


def main():
    config = load_config(DEFAULTS)
    check_options(config, RULES)
    unknown = set(config["rows"].split(",")) - set(ROWS)
    if unknown:
        raise GrafitoError(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    if not all(c.strip().isdigit() and int(c) >= 1 for c in config["serve_clients"].split(",")):
        raise GrafitoError(f"--serve_clients={config['serve_clients']}: expected client counts such as 1,4,16")
    device, dtype = setup(config["device"], config["dtype"])
    for method in config["quantize"].split(","):
        quantize.check(method, device, config["compile"])
    shape = {k: config[k] for k in ("n_layer", "n_head", "n_embd") if config[k]}
    gpt_config = GPTConfig.preset(config["model"], block_size=max(1024, config["block_size"]), **shape)
    peak, peak_source = measured_peak(device, dtype)
    copy_bandwidth = measured_copy_bandwidth(device)
    machine = (torch.cuda.get_device_name() if device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = (f"grafito bench: {config['model']} shape ({sum(p.numel() for p in GPT(gpt_config).parameters()) / 1e6:.0f}M), "
              f"{dtype}{', compiled' if config['compile'] else ''}, {device} ({machine}), torch {torch.__version__}; "
              f"peak {peak / 1e12:.2f} TFLOP/s {peak_source}; copy {copy_bandwidth:.1f} GB/s (read + written)")
    report = RowReport(config["jsonl"])
    report.record(header=header, rows=config["rows"], device=device, dtype=dtype, machine=machine)
    rng = np.random.default_rng(config["seed"])
    rows, served, loss_check, wanted = [], [], None, config["rows"].split(",")
    peer = PEERS[config["compare"]](gpt_config, device, dtype, config["compile"]) if config["compare"] else None
    try:
        if "serve" in wanted:  # first: nothing else loaded
            served = [report.row(r) for r in serve_rows(config, gpt_config, device, dtype, peer)]
        if "decode" in wanted:  # before the training rows: its memory figures are then its own
            rows += [report.row(r) for r in decode_rows(config, gpt_config, device, dtype, peer, copy_bandwidth)]
        if {"train", "masked", "lora"} & set(wanted):
            rows += [report.row(r) for r in train_rows(config, gpt_config, device, dtype, peak, rng, peer)]
        if "configs" in wanted:
            rows += [report.row(r) for r in codename_rows(config, gpt_config, device, dtype, peak, rng, peer)]
        if "dpo" in wanted:
            x, y, batch_note = pair_batch(config, rng)
            loss_check = peer.dpo_loss_check(x, y, config["beta"]) if peer is not None else None
            rows += [report.row(r) for r in dpo_rows(config, gpt_config, device, dtype, x, y, batch_note, peer)]
    finally:
        if peer is not None:
            peer.close()
    rows = with_ratios(rows)
    if rows:
        print_table(rows, header)
    if loss_check:
        theirs = next(name for name in loss_check if name != "grafito")
        print(f"DPO loss on the batch, float32, the same policy and reference weights: {theirs} "
              f"{loss_check[theirs]:.6f}, grafito {loss_check['grafito']:.6f}")
    if served:
        print(header if not rows else "")
        print_serve_table(with_serve_ratios(served))
    print(json.dumps({"config": config, "device": device, "machine": machine, "torch": torch.__version__,
                      "dtype": dtype, "peak_flops": peak, "peak_source": peak_source, "copy_gb_s": copy_bandwidth,
                      "rows": rows,
                      "serve_rows": served, "dpo_loss_check": loss_check}))


if __name__ == "__main__":
    run_cli(main)
