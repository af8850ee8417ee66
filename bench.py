"""How fast grafito trains and generates on this machine, optionally beside Hugging Face transformers.

    python bench.py                                  # gpt2 (124M) shape, random weights, no download
    python bench.py --compare=hf                     # the same shapes through transformers, interleaved
    python bench.py --model=gpt2-medium --dtype=bfloat16 --compile --device=cuda
    python bench.py --rows=serve --compare=hf        # serve.py under 1, 4, 16 clients, beside transformers serve
    python bench.py --rows=dpo --compare=trl --batch_size=8 --block_size=512   # DPO steps at obsidian_000_dpo's batch

Rows: a full fine-tuning step on plain LM batches (every token supervised) and on masked
SFT batches (real prepared data when data/<dataset> exists, else a synthetic mask with the
given supervised fraction), a LoRA step on the masked batches, and generation at batch 1 and
batch N: "prefill" is the time to the first new token (the prompt's forward pass and one
step), "decode" the KV-cache steps after it. Each row: warm-up steps excluded, `repeats` timed runs
(ours and transformers' alternating), the median reported, GPU timings synchronised.
Step memory is the process's peak during a row, everything resident included (weights,
optimizer state, activations): the peak RSS on Linux CPUs (reset to the current RSS
before each row), max allocated on GPUs.
transformers trains with torch.optim.AdamW's defaults (what a user writes), grafito with
its optimizer (optim.py), as train.py does. MFU divides the FLOPs each implementation performs (common.training_flops: transformers
computes logits at every position, grafito only where the loss is taken) by the peak of
the device: the datasheet table for GPUs, or on CPUs a bf16/fp32 matmul peak measured here
first. The serve rows (--rows=serve) start serve.py in its own process on random weights
saved with the tokenizer files, and send the same requests through N concurrent streaming
clients: aggregate generated tokens/s (all requests' tokens over the wall time) and the time
to first token's p50 and p95; with --compare=hf transformers serve --continuous-batching gets
the same requests on the same weights, the two servers taking turns. --rows=dpo: a DPO step
(LoRA: the reference is a forward pass with the adapters off; full: stored reference
log-probabilities, as train.py takes them) against an SFT step on the same rows, batch_size
pairs of pairs_dataset's train split (two rows each, grouped by length as train.py groups
them), or synthetic pairs; --compare=trl also times TRL's DPOTrainer steps on transformers'
GPT-2 of the same shape and batch, and checks that TRL's loss on the batch equals grafito's.
The last line of output is one JSON object with every number.
"""

import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
import data
import dpo
import engine
import lora
import tokenizer
from common import DTYPES, GrafitoError, autocast, peak_flops, run_cli, setup, training_flops
from configurator import SEED, check_options, integer, load_config, number, one_of
from loss import AnswerLogProbs
from model import GPT, PRESETS, GPTConfig
from optim import make_optimizer


DEFAULTS = dict(
    model="gpt2",  # a GPT-2 shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl (random weights)
    n_layer=0,  # > 0 overrides the preset (tiny shapes for smoke tests)
    n_head=0,
    n_embd=0,
    batch_size=4,
    block_size=256,
    dtype="bfloat16",  # bfloat16 | float32 | float16 (GPU only)
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
    compare="",  # 'hf': transformers on the same shapes (serve: transformers serve); 'trl': TRL's DPOTrainer (dpo)
    serve_clients="1,4,16",  # the serve rows: concurrent streaming clients (1 = the requests one at a time)
    serve_requests=16,  # requests per serve row, shared among its clients
    serve_tokens=48,  # new tokens each request asks for (greedy)
    device="auto",
    seed=1337,
)
ROWS = ("train", "masked", "lora", "decode", "configs", "serve", "dpo")
RULES = {
    "model": one_of(*PRESETS), "compare": one_of("", "hf", "trl"), "n_layer": integer(0, 4096), "n_head": integer(0, 4096),
    "n_embd": integer(0, 1 << 16), "batch_size": integer(1, 4096), "block_size": integer(1, 1 << 16),
    "supervised": number(0.0, 1.0), "lora_r": integer(1, 4096), "repeats": integer(1, 1000), "warmup": integer(0, 1000),
    "prompt_tokens": integer(1, 1 << 16), "decode_tokens": integer(2, 1 << 16),  # decode: the tokens after the first
    "decode_batch": integer(1, 4096), "seed": SEED, "serve_requests": integer(1, 1 << 16),
    "serve_tokens": integer(1, 1 << 16),
}


# ----------------------------------------------------------------------------- timing helpers

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


def interleaved(timers, repeats, warmup):
    """{name: [seconds, ...]}: each timer (a callable returning seconds) run in turns, after warm-up."""
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


# ----------------------------------------------------------------------------- the workloads

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


def hf_model(gpt_config):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=gpt_config.n_layer, n_head=gpt_config.n_head, n_embd=gpt_config.n_embd,
                                      n_positions=gpt_config.block_size, vocab_size=gpt_config.vocab_size,
                                      resid_pdrop=gpt_config.dropout, embd_pdrop=gpt_config.dropout,
                                      attn_pdrop=gpt_config.dropout))


def hf_labels(x, y):
    """transformers shifts labels itself: the label at position t is the token at t (-100 to skip)."""
    return torch.cat([torch.full_like(y[:, :1], -100), torch.where(y[:, :-1] >= 0, x[:, 1:], -100)], dim=1)


class TransformersWorker:
    """transformers.GPT2LMHeadModel in a child process started as a user would run it (without
    grafito's CPU allocator settings, AdamW with PyTorch's defaults), timed call by call over
    a pipe so that its runs alternate with ours."""

    def __init__(self, gpt_config, device, dtype, compile_model):
        env = dict(os.environ, GRAFITO_SYSTEM_MALLOC="1")
        if common.THP_SET_BY_GRAFITO:
            env.pop("THP_MEM_ALLOC_ENABLE", None)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ask(setup={"gpt_config": dataclasses.asdict(gpt_config), "device": device, "dtype": dtype, "compile": compile_model})

    def ask(self, **message):
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline() or '{"error": "transformers worker exited"}')
        if "error" in reply:
            raise GrafitoError(f"transformers worker: {reply['error']}")
        return reply

    def timer(self, name):
        return lambda: self.ask(run=name)["seconds"]

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def worker():
    """The child side of TransformersWorker: JSON requests on stdin, one JSON reply per line."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # whatever libraries print must not reach the pipe
    state, jobs = {}, {}
    for line in sys.stdin:
        message = json.loads(line)
        try:
            reply = _worker_handle(message, state, jobs)
        except Exception as err:  # reported to the parent as one line
            reply = {"error": f"{type(err).__name__}: {err}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _worker_handle(message, state, jobs):
    if "setup" in message:
        state.update(message["setup"])
        state["gpt_config"] = GPTConfig(**state["gpt_config"])
        return {"ok": True}
    device, dtype = state["device"], state["dtype"]
    if "train" in message:
        dropout = message.get("dropout", 0.0)
        if state.get("trainer_dropout") != dropout:  # AdamW with PyTorch's defaults, as a transformers user writes it
            state.pop("trainer", None)
            model = hf_model(dataclasses.replace(state["gpt_config"], dropout=dropout)).to(device)
            state["trainer"] = StepTimer(model, torch.optim.AdamW(model.parameters(), lr=1e-5), device, dtype,
                                         state["compile"])
            state["trainer_dropout"] = dropout
        x = torch.tensor(message["x"], device=device)
        labels = hf_labels(x, torch.tensor(message["y"], device=device))
        trainer = state["trainer"]
        jobs[message["train"]] = lambda: trainer.step(input_ids=x, labels=labels)
        return {"ok": True}
    if "generate" in message:
        if "decoder" not in state:
            state.pop("trainer", None)
            state["decoder"] = hf_model(state["gpt_config"]).eval().to(device=device, dtype=DTYPES[dtype])
        decoder, prompt = state["decoder"], torch.tensor(message["prompt"], device=device)
        n = message["new_tokens"]

        def generate():
            clock = StepClock(device)
            with torch.no_grad():
                decoder.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                 streamer=clock)
            return clock.first_token_and_decode()

        jobs[message["generate"]] = generate
        return {"ok": True}
    if "trl_check" in message:
        return trl_loss_check(state, message["trl_check"], message["beta"])
    if "trl" in message:
        trainer, model, inputs = trl_trainer(state, message["pairs"], message["beta"], message["trl"],
                                             message["lora_r"])

        def trl_step():
            trainer.training_step(model, inputs)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        jobs[f"trl {message['trl']}"] = trl_step
        return {"ok": True}
    if "run" in message:
        job = jobs[message["run"]]
        return {"seconds": job() if message["run"].startswith("generate") else timed(job, device)}
    if "reset_memory" in message:
        reset_peak_memory(device)
        return {"ok": True}
    if "memory" in message:
        return {"mb": peak_memory_mb(device)}
    raise ValueError(f"unknown request {message}")


def trl_trainer(state, pairs, beta, kind, lora_r, reference=None, policy=None, dtype=None):
    """(trainer, its prepared model, the batch of all pairs): TRL's DPOTrainer on transformers'
    GPT-2 as a TRL user sets it up (LoRA through peft on c_attn; full fine-tuning with
    precomputed reference log-probabilities, as train.py does), prepared as Trainer.train
    prepares it, without its loop. The pairs come tokenized, so no tokenizer is needed but
    for the pad id."""
    import tempfile

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from datasets import Dataset

    class PreTokenized(DPOTrainer):  # the pairs are ids already
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    device, dtype = state["device"], dtype or state["dtype"]
    eot = "<|endoftext|>"
    pad = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({eot: tokenizer.EOT}, eot)), eos_token=eot)
    policy = policy if policy is not None else hf_model(state["gpt_config"])
    peft_config = None
    if kind == "LoRA":
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"],
                                 fan_in_fan_out=True, task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="grafito-trl-"), per_device_train_batch_size=len(pairs),
                     learning_rate=1e-5, beta=beta, bf16=dtype == "bfloat16", use_cpu=device == "cpu", report_to="none",
                     precompute_ref_log_probs=kind == "full" and reference is None, max_length=None, seed=0,
                     gradient_checkpointing=False)  # TRL's default is on; grafito recomputes nothing
    trainer = PreTokenized(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(pairs),
                           processing_class=pad, peft_config=peft_config)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step
    trainer.create_optimizer()
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    return trainer, model, inputs


def trl_loss_check(state, pairs, beta):
    """TRL's DPO loss on the pairs, float32, a policy and a reference that differ a little; both
    saved so that grafito can compute its loss with the same weights (grafito_dpo_loss)."""
    import tempfile

    reference = hf_model(state["gpt_config"])
    policy = hf_model(state["gpt_config"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    folder = tempfile.mkdtemp(prefix="grafito-trl-check-")
    policy.save_pretrained(f"{folder}/policy")
    reference.save_pretrained(f"{folder}/reference")
    trainer, model, inputs = trl_trainer(state, pairs, beta, "full", 0, reference=reference, policy=policy,
                                         dtype="float32")
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer._prepare_inputs(inputs))
    return {"trl_loss": loss.item(), "policy": f"{folder}/policy", "reference": f"{folder}/reference"}


def grafito_dpo_loss(check, x, y, beta):
    """grafito's DPO loss on the batch with the weights trl_loss_check saved, float32."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        policy, reference = (AnswerLogProbs(GPT.from_pretrained(check[name]).eval())(xt, yt)
                             for name in ("policy", "reference"))
    loss_sum, _ = dpo.step_loss(policy, reference, beta, 0.0)
    return loss_sum.item() / (len(x) // 2)  # the mean over the pairs, as TRL reports it


def training_row(name, note, x, y, ours, gpt_config, config, device, peak, theirs=None, lora_row=False):
    """Row dicts for one training step timed on batch (x, y): ours, and transformers' when given."""
    B, T = x.shape
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    positions = torch.from_numpy(np.flatnonzero(y >= 0)).to(device)
    timers = [("grafito", lambda: timed(lambda: ours.step(idx=xt, targets=yt, supervised=positions), device))]
    if theirs is not None:
        theirs.ask(train=name, x=x.tolist(), y=y.tolist(), dropout=gpt_config.dropout)
        timers.append(("transformers", theirs.timer(name)))
        theirs.ask(reset_memory=True)
    reset_peak_memory(device)
    times = interleaved(timers, config["repeats"], config["warmup"])
    memory = {"grafito": peak_memory_mb(device)}
    if theirs is not None:
        memory["transformers"] = theirs.ask(memory=True)["mb"]
    supervised = {"grafito": int((y >= 0).sum()), "transformers": B * T}  # transformers: logits everywhere
    rows = []
    for who, seconds in times.items():
        median = statistics.median(seconds)
        flops = training_flops(gpt_config, B * T, supervised[who], T, lora=lora_row)
        rows.append({"row": name, "impl": who, "batch": note, "tokens_per_s": B * T / median, "step_ms": median * 1e3,
                     "mfu": flops / median / peak, "memory_mb": memory[who],
                     "times_ms": [round(t * 1e3, 1) for t in seconds]})
    return rows


def train_rows(config, gpt_config, device, dtype, peak, rng, theirs):
    """The default shape: full steps on plain LM and masked SFT batches, and a LoRA step."""
    rows = []
    B, T = config["batch_size"], config["block_size"]
    wanted = config["rows"].split(",")
    x_plain = rng.integers(0, tokenizer.VOCAB_SIZE, (B, T))
    y_plain = rng.integers(0, tokenizer.VOCAB_SIZE, (B, T))
    x_masked, y_masked, source = masked_batch(config["dataset"], B, T, config, rng)
    timing = dict(gpt_config=gpt_config, config=config, device=device, peak=peak)
    if "train" in wanted or "masked" in wanted:
        ours = our_trainer(gpt_config, device, dtype, config["compile"])
        if "train" in wanted:
            rows += training_row("train full, plain LM", f"{B}x{T}, all supervised", x_plain, y_plain, ours,
                                 theirs=theirs, **timing)
        if "masked" in wanted:
            rows += training_row("train full, masked SFT", f"{B}x{T}, {source}", x_masked, y_masked, ours,
                                 theirs=theirs, **timing)
        del ours
    if "lora" in wanted:
        ours = our_trainer(gpt_config, device, dtype, config["compile"], lora.LoRAConfig(r=config["lora_r"]))
        rows += training_row("train LoRA, masked SFT", f"{B}x{T}, r={config['lora_r']} q,v", x_masked, y_masked, ours,
                             lora_row=True, **timing)
    return rows


def codename_rows(config, gpt_config, device, dtype, peak, rng, theirs):
    """Training steps at each codename config's own batch x block, dropout and LoRA settings
    (on the --model shape: a CPU cannot time gpt2-xl), beside transformers' at the same settings;
    a LoRA config also gets our full step at its shape, for the ratio."""
    from train import load_train_config  # the config exactly as train.py resolves it

    rows = []
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
            rows += training_row(f"{name} LoRA", note, x, y, ours, lora_row=True, **timing)
            del ours
            rows += training_row(f"{name} as full", note, x, y, our_trainer(shape, device, dtype, config["compile"]),
                                 **timing)
        else:
            rows += training_row(name, note, x, y, our_trainer(shape, device, dtype, config["compile"]), theirs=theirs,
                                 **timing)
    return rows


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


def dpo_rows(config, gpt_config, device, dtype, rng, theirs):
    """A DPO step against an SFT step on the same rows, LoRA and full; TRL's DPOTrainer beside them."""
    rows = []
    x, y, batch_note = pair_batch(config, rng)
    B, n_tokens = config["batch_size"], x.size
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    supervised = torch.from_numpy(np.flatnonzero(y >= 0)).to(device)
    loss_check = None
    if theirs is not None:
        check = theirs.ask(trl_check=pair_ids(x, y), beta=config["beta"])
        loss_check = {"trl": check["trl_loss"], "grafito": grafito_dpo_loss(check, x, y, config["beta"])}
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
        if theirs is not None:
            theirs.ask(trl=kind, pairs=pair_ids(x, y), beta=config["beta"], lora_r=config["lora_r"])
            timers.append(("trl DPO", theirs.timer(f"trl {kind}")))
        reset_peak_memory(device)
        times = interleaved(timers, config["repeats"], config["warmup"])
        memory = peak_memory_mb(device)
        median = {name: statistics.median(seconds) for name, seconds in times.items()}
        for name, seconds in times.items():
            label = name.split(" ", 1)[1]
            rows.append({"row": f"train {kind}, {'SFT on the same rows' if label == 'SFT' else label}",
                         "impl": name.split()[0], "batch": batch_note, "tokens_per_s": n_tokens / median[name],
                         "step_ms": median[name] * 1e3, "mfu": None,
                         "memory_mb": memory if name.startswith("grafito") else None,
                         "times_ms": [round(t * 1e3, 1) for t in seconds]})
            if name.startswith("grafito DPO"):
                rows[-1]["dpo_cost_vs_sft"] = median[name] / median["grafito SFT"]
            if name == "trl DPO":
                rows[-1]["time_vs_grafito"] = median[name] / median["grafito DPO"]
        trainer = model = policy = stored = references = None  # free this kind's model before the next
    return rows, loss_check


def pair_ids(x, y):
    """The batch's pairs as TRL takes them: prompt, chosen answer and rejected answer ids."""
    B = len(x) // 2

    def prompt_and_answer(row):
        first = int(np.argmax(y[row] >= 0))  # y[t] is the token at t + 1
        return x[row, :first + 1].tolist(), y[row][y[row] >= 0].tolist()

    pairs = []
    for i in range(B):
        (prompt, chosen), (_, rejected) = prompt_and_answer(i), prompt_and_answer(B + i)
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def decode_rows(config, gpt_config, device, dtype, theirs):
    rows = []
    torch.manual_seed(0)
    ours = engine.Engine(GPT(gpt_config).to(device=device, dtype=DTYPES[dtype]), compile=config["compile"])
    P, N = config["prompt_tokens"], config["decode_tokens"]
    if P + N > gpt_config.block_size:
        raise GrafitoError(f"prompt_tokens + decode_tokens = {P + N} exceed block_size {gpt_config.block_size}")
    greedy = engine.Sampling(temperature=0)

    def ours_generate(prompts):
        clock = StepClock(device)
        clock.put(prompts)  # as transformers' streamer is given the prompt first
        for _ in ours.generate(prompts, N, greedy):
            clock.put(None)
        return clock.first_token_and_decode()

    for batch in (1, config["decode_batch"]):
        prompts = torch.randint(0, tokenizer.VOCAB_SIZE, (batch, P)).tolist()
        timers = [("grafito", lambda prompts=prompts: ours_generate(prompts))]
        if theirs is not None:
            theirs.ask(generate=f"generate {batch}", prompt=prompts, new_tokens=N)
            timers.append(("transformers", theirs.timer(f"generate {batch}")))
            theirs.ask(reset_memory=True)
        reset_peak_memory(device)
        times = interleaved(timers, config["repeats"], 1)
        memory = {"grafito": peak_memory_mb(device)}
        if theirs is not None:
            memory["transformers"] = theirs.ask(memory=True)["mb"]
        for who in memory:
            first = statistics.median(t[0] for t in times[who])
            decode = statistics.median(t[1] for t in times[who])
            rows.append({"row": f"prefill, batch {batch}", "impl": who, "batch": f"{batch}x{P} prompt",
                         "tokens_per_s": batch * P / first, "step_ms": first * 1e3, "mfu": None,
                         "memory_mb": memory[who]})
            rows.append({"row": f"decode, batch {batch}", "impl": who, "batch": f"{batch}x{N - 1} new tokens",
                         "tokens_per_s": batch * (N - 1) / decode, "step_ms": decode / (N - 1) * 1e3,
                         "mfu": None, "memory_mb": memory[who]})
    return rows


# ----------------------------------------------------------------------------- serving under load

def serve_prompts(count, seed):
    """Distinct chat questions of 15-25 words, the same for every server."""
    words = ("river mountain engine garden letter window planet music number story kitchen market bridge "
             "winter forest signal doctor island yellow silver").split()
    rng = np.random.default_rng(seed)
    return [f"request {i}: " + " ".join(rng.choice(words, rng.integers(15, 26))) for i in range(count)]


def start_server(name, command, port, log):
    """A server process, once its /health answers 200 (or an error with the end of its log)."""
    import httpx

    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(__file__)))
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    log.seek(0)
    raise GrafitoError(f"{name} did not start: {log.read()[-2000:]}")


def load_test(url, model, prompts, clients, max_tokens):
    """Stream every prompt through `clients` concurrent clients: (tokens/s over the wall time, times to first token)."""
    import asyncio

    import httpx

    async def run():
        todo, results = list(prompts), []
        async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=clients + 2)) as http:
            async def client():
                while todo:
                    prompt, started, first, tokens = todo.pop(0), time.perf_counter(), None, 0
                    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                        if response.status_code != 200:
                            raise GrafitoError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]}")
                        async for line in response.aiter_lines():
                            data = line.removeprefix("data:").strip()
                            if not line.startswith("data:") or data == "[DONE]":
                                continue
                            event = json.loads(data)
                            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                                first = first or time.perf_counter()
                            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                    results.append((first - started, tokens))

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return sum(t for _, t in results) / (time.perf_counter() - started), [s for s, _ in results]

    return asyncio.run(run())


def serve_rows(config, gpt_config, device, dtype):
    """serve.py (and transformers serve) under 1, 4, 16 concurrent clients, taking turns."""
    import tempfile

    import export

    clients = [int(c) for c in config["serve_clients"].split(",")]
    prompts, tokens = serve_prompts(config["serve_requests"], config["seed"]), config["serve_tokens"]
    work = Path(tempfile.mkdtemp(prefix="grafito-bench-serve-"))
    torch.manual_seed(0)
    folder = work / "model"  # weights in transformers' format, the BPE files and the chat template
    GPT(gpt_config).save_pretrained(folder)
    export.write_tokenizer(folder, gpt_config.block_size)
    port = 18000 + os.getpid() % 1000
    servers = [("grafito", [sys.executable, "serve.py", f"--init_from={folder}", f"--device={device}",
                            f"--dtype={dtype}", f"--port={port}", f"--max_batch={max(clients)}",
                            f"--compile={config['compile']}", "--log_level=warning"], "grafito")]
    if config["compare"] == "hf":
        # its KV cache sized to twice what these requests need (prompts under 64 tokens): by default it
        # claims most of the machine's memory
        blocks = math.ceil(max(clients) * (64 + tokens) / 32) * 2
        servers.append(("transformers serve", [
            sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--continuous-batching",
            f"--device={device}", f"--dtype={dtype}", f"--port={port + 1}", "--cb-block-size=32",
            f"--cb-num-blocks={blocks}", "--cb-max-batch-tokens=2048", "--log-level=warning"], str(folder)))
    rows, processes, logs = [], [], []
    try:
        for i, (impl, command, model) in enumerate(servers):  # both up at once: idle, neither takes the CPU
            logs.append(open(work / f"{impl.replace(' ', '_')}.log", "w+"))
            processes.append(start_server(impl, command, port + i, logs[-1]))
            url = f"http://127.0.0.1:{port + i}"
            load_test(url, model, prompts[:2], 1, 4)  # warm-up: first-request set-up, the batch shapes
            load_test(url, model, prompts[:max(clients)], max(clients), 4)
        for n in clients:  # the servers take turns at each load, so the machine's drift hits both alike
            for i, (impl, _, model) in enumerate(servers):
                tokens_per_s, firsts = load_test(f"http://127.0.0.1:{port + i}", model, prompts, n, tokens)
                rows.append({"row": f"serve, {n} clients", "impl": impl,
                             "batch": f"{len(prompts)} requests x {tokens} new tokens", "tokens_per_s": tokens_per_s,
                             "ttft_p50_s": float(np.percentile(firsts, 50)),
                             "ttft_p95_s": float(np.percentile(firsts, 95))})
                print(f"({rows[-1]['row']}, {impl}: {tokens_per_s:.1f} tokens/s)", file=sys.stderr, flush=True)
    finally:
        for process in processes:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        alone = next(o for o in rows if o["impl"] == r["impl"] and o["row"] == f"serve, {min(clients)} clients")
        theirs = next((o for o in rows if o["impl"] == "transformers serve" and o["row"] == r["row"]), None)
        r["ratio_vs_one_client"] = r["tokens_per_s"] / alone["tokens_per_s"]
        r["ratio_vs_transformers"] = (r["tokens_per_s"] / theirs["tokens_per_s"]
                                      if theirs and r["impl"] == "grafito" else None)
    return rows


def print_serve_table(rows):
    print("| row | impl | requests | tokens/s | vs 1 client | TTFT p50 s | TTFT p95 s | ours/transformers serve |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['ratio_vs_transformers']:.2f}x" if r["ratio_vs_transformers"] else ""
        print(f"| {r['row']} | {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {r['ratio_vs_one_client']:.2f}x "
              f"| {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {ratio} |")


def with_ratios(rows):
    """ours/theirs on every row that has both, and LoRA over our full masked step."""
    by_key = {(r["row"], r["impl"]): r for r in rows}
    for r in rows:
        other = by_key.get((r["row"], "transformers"))
        r["ratio_vs_transformers"] = r["tokens_per_s"] / other["tokens_per_s"] if other and r["impl"] == "grafito" else None
    pairs = [("train LoRA, masked SFT", "train full, masked SFT")]
    pairs += [(r["row"], r["row"].replace(" LoRA", " as full")) for r in rows if r["row"].endswith(" LoRA")]
    for lora_name, full_name in pairs:
        lora_row, full_row = by_key.get((lora_name, "grafito")), by_key.get((full_name, "grafito"))
        if lora_row and full_row:
            lora_row["ratio_vs_full"] = lora_row["tokens_per_s"] / full_row["tokens_per_s"]
    return rows


def print_table(rows, header):
    print(header)
    print("| row | impl | batch | tokens/s | ms/step (per token for decode) | MFU | ours/transformers | peak memory MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r.get("ratio_vs_transformers")
        ratio = (f"{ratio:.2f}x" if ratio else f"{r['ratio_vs_full']:.2f}x our full step" if r.get("ratio_vs_full")
                 else f"step time {r['dpo_cost_vs_sft']:.2f}x SFT's" if r.get("dpo_cost_vs_sft")
                 else f"step time {r['time_vs_grafito']:.2f}x grafito's" if r.get("time_vs_grafito") else "")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else ""
        memory = f"{r['memory_mb']:,.0f}" if r["memory_mb"] is not None else ""
        print(f"| {r['row']} | {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {r['step_ms']:,.1f} | {mfu} | {ratio} | {memory} |")


def main():
    config = load_config(DEFAULTS)
    check_options(config, RULES)
    unknown = set(config["rows"].split(",")) - set(ROWS)
    if unknown:
        raise GrafitoError(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    if not all(c.strip().isdigit() and int(c) >= 1 for c in config["serve_clients"].split(",")):
        raise GrafitoError(f"--serve_clients={config['serve_clients']}: expected client counts such as 1,4,16")
    device, dtype = setup(config["device"], config["dtype"])
    shape = {k: config[k] for k in ("n_layer", "n_head", "n_embd") if config[k]}
    gpt_config = GPTConfig.preset(config["model"], block_size=max(1024, config["block_size"]), **shape)
    peak, peak_source = measured_peak(device, dtype)
    machine = (torch.cuda.get_device_name() if device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = (f"grafito bench: {config['model']} shape ({sum(p.numel() for p in GPT(gpt_config).parameters()) / 1e6:.0f}M), "
              f"{dtype}{', compiled' if config['compile'] else ''}, {device} ({machine}), torch {torch.__version__}; "
              f"peak {peak / 1e12:.2f} TFLOP/s {peak_source}")
    rng = np.random.default_rng(config["seed"])
    rows, loss_check, wanted = [], None, config["rows"].split(",")
    served = serve_rows(config, gpt_config, device, dtype) if "serve" in wanted else []  # first: nothing else loaded
    model_rows = {"train", "masked", "lora", "decode", "configs", "dpo"} & set(wanted)
    theirs = (TransformersWorker(gpt_config, device, dtype, config["compile"])
              if config["compare"] and model_rows else None)
    hf, trl = (theirs, None) if config["compare"] == "hf" else (None, theirs)
    try:
        if "decode" in wanted:  # first: its memory figures are then its own
            rows += decode_rows(config, gpt_config, device, dtype, hf)
        if {"train", "masked", "lora"} & set(wanted):
            rows += train_rows(config, gpt_config, device, dtype, peak, rng, hf)
        if "configs" in wanted:
            rows += codename_rows(config, gpt_config, device, dtype, peak, rng, hf)
        if "dpo" in wanted:
            dpo, loss_check = dpo_rows(config, gpt_config, device, dtype, rng, trl)
            rows += dpo
    finally:
        if theirs is not None:
            theirs.close()
    rows = with_ratios(rows)
    if rows:
        print_table(rows, header)
    if loss_check:
        print(f"DPO loss on the batch, float32, the same policy and reference weights: TRL {loss_check['trl']:.6f}, "
              f"grafito {loss_check['grafito']:.6f}")
    if served:
        print(header if not rows else "")
        print_serve_table(served)
    print(json.dumps({"config": config, "device": device, "machine": machine, "torch": torch.__version__,
                      "dtype": dtype, "peak_flops": peak, "peak_source": peak_source, "rows": rows,
                      "serve_rows": served, "trl_loss_check": loss_check}))


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        run_cli(main)
