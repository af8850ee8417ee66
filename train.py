"""Train a grafito model: fine-tune GPT-2 fully or with LoRA on chat conversations (SFT) or
preference pairs (DPO), or train on every token of raw text (LM), from scratch or not.

    python train.py config/ruby_002.py                           # gpt2 124M on grafito-25k
    python train.py config/cpu_tiny.py                           # the whole loop on 2 CPU cores, minutes
    python train.py config/ruby_002.py --init_from=resume        # continue out_dir's last checkpoint
    torchrun --standalone --nproc_per_node=8 train.py config/obsidian_000.py   # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/emerald_003.py --fsdp=True   # sharded (FSDP)
    python train.py config/emerald_003.py --plan --plan_world=8  # memory per GPU, loading no weights

The design, top to bottom:
1. set-up: the processes and device (distributed.py); the run folder, started or resumed
   (checkpoint.py: nothing of an earlier run is deleted until the new one is known to start);
   the objective, which owns the data and the loss (objective.py: sft.SFT for the answers of
   conversations, dpo.DPO for preference pairs, lm.LM for raw text); the model (checked
   against the memory plan, memory.py; DDP's copies or FSDP's shards) and AdamW.
2. the loop (train()): each step takes the objective's next items, gives every process its
   share in micro-batches, weighs every supervised token (or pair) alike wherever it landed,
   and steps the optimizer. It never asks which objective it runs.
3. every eval_interval steps, rank 0 (with FSDP every rank, each holding a shard) evaluates and saves
   (evaluate_and_save): best/ when the val loss improved, then ckpt/, enough to resume exactly.
"""

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import lora
import memory
from common import DTYPES, GrafitoError, autocast, check_memory, peak_flops, run_cli, to_device, trim_cpu_memory
from configurator import SEED, check_options, integer, invalid, load_config, not_empty, number, one_of
from distributed import (check_shared_folder, close_distributed, gather_rng_states, grad_scaler, gradient_sync,
                         leave_torchrun_process, model_work, on_first_rank, set_rng_state, setup_distributed,
                         share_from_first_rank, shard_model, wrap_ddp)
from dpo import DPO
from lm import LM
from model import GPT, GPTConfig
from objective import dataset_names, mixture_weights
from optim import learning_rate, make_optimizer
from progress import Window, announce, log_window, write_log
from sft import SFT

OBJECTIVES = {"sft": SFT, "dpo": DPO, "lm": LM}

DEFAULTS = dict(  # every option and its default: python train.py --help lists them, --key=value sets one
    # where things go and how often
    out_dir="out",
    overwrite=False,  # start a new run in an out_dir that holds one: its checkpoints, merged/ and log are deleted first
    init_from="gpt2",  # scratch | gpt2, gpt2-medium, ... | hub repo id | local folder | a run's out_dir | resume
    eval_interval=100,  # steps between evaluations; each one writes out_dir/ckpt (and best/ on improvement)
    eval_iters=0,  # val batches per evaluation, 0 for the whole val split
    log_interval=10,
    early_stop_patience=0,  # stop after this many evaluations without a better val loss; 0 never
    plot=True,  # out_dir/loss.png at the end, if matplotlib is installed
    # data
    dataset="grafito25k",  # folder under data/ or a path to a prepared folder; "a,b" mixes several of one kind
    dataset_weights="",  # a mixture's shares, e.g. "3,1"; empty: in proportion to the datasets' sizes
    block_size=1024,
    batch_size=8,  # rows per micro-batch, per process (objective=dpo: pairs, two rows each)
    gradient_accumulation_steps=1,  # micro-batches per step over all processes (nanoGPT's meaning)
    tokens_per_step=0,  # > 0: choose gradient_accumulation_steps to reach this many tokens per step
    max_iters=1000,
    epochs=0.0,  # > 0: sets max_iters to this many passes over the packed training rows or pairs (the later wins)
    # objective: sft (cross-entropy of the answers) | dpo (preference pairs against the starting model)
    # | lm (next-token on every token of a text dataset: pretraining)
    objective="sft",
    beta=0.1,  # dpo: how far from the reference the policy may go; a reward is beta * (log pi - log pi_ref)
    label_smoothing=0.0,  # dpo: > 0 is conservative DPO, the share of pairs taken to be mislabelled
    # dpo: auto = LoRA: the model with its adapters off, full: stored; stored = the starting model's log-probabilities,
    # computed once before the first step (a LoRA step then skips the reference's forward pass)
    dpo_reference="auto",
    # model, for init_from=scratch
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=True,
    # LoRA: lora_r > 0 freezes the model and trains adapters only
    lora_r=0,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets="q,v",  # comma-separated: q, k, v, attn_proj, mlp_fc, mlp_proj
    lora_merge=False,  # also write out_dir/merged: the best adapter merged into its base
    # optimizer: AdamW, warmup then cosine decay (or constant)
    learning_rate=1e-4,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 disables clipping
    lr_schedule="cosine",  # cosine | constant
    warmup_iters=50,
    lr_decay_iters=0,  # cosine reaches min_lr here; 0 means max_iters
    min_lr=1e-5,
    # system
    device="auto",  # auto | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto (bf16 on CPUs and Ampere+ GPUs, fp16 on older GPUs) | bfloat16 | float16 | float32
    compile=False,  # torch.compile the model
    seed=1337,
    backend="auto",  # DDP/FSDP backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    # memory (memory.py): --plan prints what each GPU needs, loading no weights, and exits
    fsdp=False,  # under torchrun: shard weights, gradients and AdamW state over the processes instead of DDP's copies
    fsdp_reduce_every_micro_batch=False,  # fsdp: reduce gradients after each micro-batch (less memory, more traffic)
    activation_checkpointing=False,  # recompute each block's activations in the backward (less memory, more compute)
    plan=False,
    plan_world=0,  # --plan for this many processes; 0: torchrun's WORLD_SIZE, else 1
)
AT_LEAST_1, AT_LEAST_0 = integer(1), integer(0)
RULES = {
    "out_dir": not_empty(), "dataset": not_empty(), "init_from": not_empty(),
    "block_size": integer(1, 1 << 20), "batch_size": integer(1, 1 << 16), "gradient_accumulation_steps": AT_LEAST_1,
    "eval_interval": AT_LEAST_1, "log_interval": AT_LEAST_1, "eval_iters": AT_LEAST_0, "early_stop_patience": AT_LEAST_0,
    "tokens_per_step": AT_LEAST_0, "max_iters": AT_LEAST_0, "epochs": number(0.0, 1e6), "warmup_iters": AT_LEAST_0,
    "lr_decay_iters": AT_LEAST_0, "lora_r": AT_LEAST_0, "lora_alpha": (lambda v: v > 0, "positive"),
    "learning_rate": (lambda v: v > 0, "positive"), "min_lr": number(0.0), "weight_decay": number(0.0),
    "beta1": number(0.0, 1.0, high_open=True), "beta2": number(0.0, 1.0, high_open=True),
    "grad_clip": (lambda v: v >= 0, "0 (no clipping) or positive"), "lr_schedule": one_of("cosine", "constant"),
    "dropout": number(0.0, 1.0, high_open=True), "backend": one_of("auto", "nccl", "gloo"), "seed": SEED,
    "objective": one_of("sft", "dpo", "lm"), "beta": (lambda v: v > 0, "positive"),
    "label_smoothing": number(0.0, 0.5, high_open=True), "dpo_reference": one_of("auto", "stored"),
    "plan_world": integer(0, 1 << 20),
}


def load_train_config(argv=None):
    """DEFAULTS, then config files and --key=value overrides; of epochs and max_iters the later wins."""
    return load_config(DEFAULTS, argv, alternatives=[("epochs", "max_iters")])


def check_config(config):
    check_options(config, RULES)
    if config["max_iters"] < 1 and config["epochs"] == 0:
        raise invalid("max_iters", config["max_iters"], "at least 1 (or set epochs)")
    if config["min_lr"] > config["learning_rate"]:
        raise invalid("min_lr", config["min_lr"], f"at most learning_rate ({config['learning_rate']})")
    if config["init_from"] == "scratch":
        scratch_config(config)  # checks the model's sizes
    if config["lora_r"] and config["init_from"] == "scratch":
        raise invalid("lora_r", config["lora_r"], "0 with init_from=scratch (LoRA adapts a pretrained model)")
    if config["objective"] == "dpo" and config["init_from"] == "scratch":
        raise invalid("init_from", "scratch", "a model to tune with objective=dpo (it is also the reference)")
    if config["lora_r"]:
        lora_settings(config)  # raises on unknown targets
    names = dataset_names(config)
    mixture_weights(config, names, [1] * len(names))  # raises on weights that do not fit the datasets


def lora_settings(config):
    targets = tuple(t.strip() for t in config["lora_targets"].split(",") if t.strip())
    return lora.LoRAConfig(r=config["lora_r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"], targets=targets)


def scratch_config(config):
    return GPTConfig(block_size=config["block_size"], n_layer=config["n_layer"], n_head=config["n_head"],
                     n_embd=config["n_embd"], dropout=config["dropout"], bias=config["bias"])


def print_plan(config):
    """--plan: each GPU's memory for this config's step, by strategy; reads the model's shape, no weights."""
    world = config["plan_world"] or int(os.environ.get("WORLD_SIZE", 1))
    source = checkpoint.model_source(config["init_from"], config["out_dir"], latest_checkpoint=True)
    shape = scratch_config(config) if source is None else checkpoint.model_config(source)
    print(memory.describe_run(config, shape, lora_settings(config) if config["lora_r"] else None,
                              OBJECTIVES[config["objective"]].rows_per_item, world, accumulation_steps(config, world)))


def accumulation_steps(config, world):
    """Micro-batches per step over all processes, rounded up to a multiple of the process count."""
    if config["tokens_per_step"]:
        rows = config["batch_size"] * OBJECTIVES[config.get("objective", "sft")].rows_per_item
        steps = math.ceil(config["tokens_per_step"] / (rows * config["block_size"]))
    else:
        steps = config["gradient_accumulation_steps"]
    return math.ceil(steps / world) * world


# ----------------------------------------------------------------------------- the run and its set-up

@dataclass
class Run:
    """What the run's parts share: its options and processes, its folder and where its weights
    come from, and its progress, which every checkpoint saves."""
    config: dict
    rank: int
    world: int
    device: str
    dtype: str
    out_dir: Path
    init_source: checkpoint.Source = None  # where the weights come from; None: init_from=scratch
    resume_state: dict = None  # the checkpoint's train state, when resuming
    base_name: str = "scratch"  # what the weights started from, recorded in adapters and states
    base_fingerprint: str = None
    accumulation: int = 1  # micro-batches per step over all processes
    step: int = 0
    best_val: float = math.inf
    evals_without_gain: int = 0
    lock: checkpoint.RunLock = None  # rank 0's hold on out_dir
    log: object = None  # rank 0's log.jsonl
    bar: tqdm = None

    @property
    def resume(self):
        return self.resume_state is not None


def start_or_resume(config, rank, world, device, dtype):
    """The Run: a resume's checkpoint read and checked, or a new run's start checked; nothing
    in out_dir is deleted or written yet."""
    out_dir = Path(config["out_dir"]).expanduser()
    checkpoint.check_writable(out_dir)
    check_shared_folder(out_dir, rank, world, device)
    run = Run(config, rank, world, device, dtype, out_dir)
    if config["init_from"] == "resume":
        state = checkpoint.load_train_state(out_dir)
        checkpoint.check_resume(state, config, dtype, accumulation_steps(config, world), world,
                                OBJECTIVES[config["objective"]].resume_keys)
        run.resume_state, run.init_source = state, checkpoint.model_source("resume", out_dir, latest_checkpoint=True)
        run.base_name, run.base_fingerprint = state["base_model"], state["base_fingerprint"]
        run.step, run.best_val, run.evals_without_gain = state["step"], state["best_val"], state["evals_without_gain"]
    else:
        run.init_source = checkpoint.model_source(config["init_from"], out_dir)
        checkpoint.check_new_run(out_dir, run.init_source, config["overwrite"])
        run.base_name = "scratch" if run.init_source is None else run.init_source.describe()
    return run


def build_model(run):
    """The model to train, LoRA applied when lora_r > 0 (or restored on resume), checked
    against this device's memory (memory.py's plan for this run) before it is moved there;
    with FSDP left where it is, for shard_model to move each rank's shard."""
    config, advice = run.config, "choose a smaller model, batch_size or block_size (or see --plan)"
    rows_per_item = OBJECTIVES[config["objective"]].rows_per_item
    needs = lambda shape, adapters: memory.for_run(config, shape, adapters, rows_per_item, run.world, run.accumulation,
                                                   run.dtype).total
    if run.resume:  # a scratch run without biases was saved with zero biases: rebuilt without
        no_bias = {"bias": False} if run.base_name == "scratch" and not config["bias"] else {}
        model = checkpoint.load_model(run.init_source, merge=False, sharded=config["fsdp"], dropout=config["dropout"],
                                      **no_bias)
    elif run.init_source is None:
        check_memory(needs(scratch_config(config), None), run.device, "this model", advice)
        model = GPT(scratch_config(config))
    else:  # a GPT-2 name, a hub id, a folder or an earlier run (its adapters folded in)
        model = checkpoint.load_model(run.init_source, dropout=config["dropout"])
        if config["lora_r"]:
            lora.apply_lora(model, lora_settings(config))
    if config["block_size"] > model.config.block_size:
        raise invalid("block_size", config["block_size"], f"at most the model's context ({model.config.block_size})")
    is_lora, half = bool(lora.lora_layers(model)), run.dtype in ("bfloat16", "float16")
    check_memory(needs(model.config, model.lora_config if is_lora else None), run.device, "a training step", advice)
    if is_lora and not run.resume:
        run.base_fingerprint = checkpoint.base_fingerprint(run.init_source)
    if is_lora and half and not config["fsdp"]:  # FSDP gathers every weight in the 16-bit dtype itself
        lora.cast_frozen_linears(model, DTYPES[run.dtype])
    model.activation_checkpointing = config["activation_checkpointing"]
    return model if config["fsdp"] else model.to(run.device)


def start_run(run, objective, model, per_step, max_iters):
    """Rank 0: take out_dir (a second run there stops here, before it changes anything), clear
    an earlier run (overwrite), say what will happen, and do the objective's first work."""
    run.lock = checkpoint.RunLock(run.out_dir)
    if not run.resume:
        checkpoint.clear_run(run.out_dir)
    checkpoint.remove_stale_saves(run.out_dir)
    (run.out_dir / "train_config.json").write_text(json.dumps(run.config, indent=2) + "\n")
    announce(run, objective, model, per_step, max_iters)
    objective.start(run.out_dir, run.resume)
    run.log = checkpoint.open_log(run.out_dir, run.step)


# ----------------------------------------------------------------------------- evaluating, saving, logging

def evaluate_and_save(run, objective, model, optimizer, scaler, rng_states, train_loss=None):
    """Rank 0 (with FSDP every rank): evaluate, write best/ (on improvement) then ckpt/; 1 means stop early."""
    improved = run.step > 0
    if objective.val_sets:
        metrics = objective.validate(model, run.device, run.dtype)
        if run.config["fsdp"]:  # every rank evaluated: rank 0's figures decide for all
            metrics = share_from_first_rank(metrics)
        val_loss = metrics["loss"]
        if not math.isfinite(val_loss):
            raise GrafitoError(f"validation loss became {val_loss} at step {run.step}; stopped without saving")
        improved = run.step > 0 and val_loss < run.best_val  # step 0 is the starting model: a reference
        if improved:
            run.best_val, run.evals_without_gain = val_loss, 0
        elif run.step > 0:
            run.evals_without_gain += 1
        if run.rank == 0:
            run.bar.write(f"step {run.step}: {objective.describe(metrics)}"
                          + (f", train loss {train_loss:.4f}" if train_loss is not None else "")
                          + (" (best)" if improved else ""))
            write_log(run, {"step": run.step, **{f"val_{k}": v for k, v in metrics.items()}})
    if run.step > 0:
        state = {"format": checkpoint.STATE_FORMAT, "step": run.step,
                 "scaler": scaler.state_dict(), "sampler": objective.state_dict(), "rng": rng_states,
                 "best_val": run.best_val, "evals_without_gain": run.evals_without_gain, "config": run.config,
                 "base_model": run.base_name, "base_fingerprint": run.base_fingerprint,
                 "accumulation": run.accumulation, "world": run.world, "resolved_dtype": run.dtype,
                 **objective.run_state()}
        checkpoint.save_run(run.out_dir, model, optimizer, state, improved, run.base_name, run.base_fingerprint,
                            run.rank, run.world, run.device, sharded=run.config["fsdp"])
    patience = run.config["early_stop_patience"]
    if patience and run.evals_without_gain >= patience:
        if run.rank == 0:
            run.bar.write(f"early stop: no better val loss in {patience} evaluations")
        return 1
    return 0


def finish(run, objective, model):
    """Rank 0, after the last step: the summary, a LoRA run's merged/ folder, loss.png."""
    run.log.close()
    best = objective.describe_best(run.best_val) if objective.val_sets else "no val split"
    print(f"done: {run.step} steps, {best}; weights in {run.out_dir / checkpoint.BEST}")
    if lora.lora_layers(model) and run.config["lora_merge"]:  # into a fresh float32 base, not the training copy
        merged = checkpoint.load_model(run.out_dir / checkpoint.BEST)
        checkpoint.save_checkpoint(run.out_dir, checkpoint.MERGED, merged)
        print(f"merged adapter into the base: {run.out_dir / checkpoint.MERGED}")
    if run.config["plot"]:
        checkpoint.plot_log(run.out_dir, objective.measure)


# ----------------------------------------------------------------------------- the training loop

def train(config):
    """Train as config says; returns the trained model (unwrapped; with FSDP this rank's shards of it)."""
    # 1. processes and device, the run folder (checked, nothing deleted yet), the objective's data
    rank, local_rank, world, device, dtype = setup_distributed(config)
    run = start_or_resume(config, rank, world, device, dtype)
    objective = OBJECTIVES[config["objective"]](config)
    run.accumulation = accumulation_steps(config, world)
    B = config["batch_size"]
    per_step = B * run.accumulation  # items (rows or pairs) per step, over all processes
    max_iters = (math.ceil(config["epochs"] * objective.items_per_epoch / per_step) if config["epochs"] > 0
                 else config["max_iters"])

    # 2. the model, what the objective trains of it (sharded, compiled, DDP-wrapped), the optimizer, the resumed state
    raw_model = build_model(run)
    objective.check_model(raw_model)
    is_lora, sharded = bool(lora.lora_layers(raw_model)), config["fsdp"]
    model = objective.trained_module(raw_model)
    if sharded:  # before the optimizer: its parameters are the shards
        shard_model(raw_model, model, device, dtype, world)
    optimizer = make_optimizer(raw_model, config["learning_rate"], config["weight_decay"],
                               (config["beta1"], config["beta2"]), device, fused=not (sharded and dtype == "float16"))
    scaler = grad_scaler(device, dtype, sharded)
    if run.resume:  # with FSDP also the trained weights' shards
        checkpoint.restore(run.resume_state, run.out_dir, raw_model, optimizer, scaler, sharded)
        objective.load_state_dict(run.resume_state["sampler"])
        if rank < len(run.resume_state["rng"]):  # a rank the saved run did not have keeps its fresh seed
            set_rng_state(run.resume_state["rng"][rank])
    if config["compile"]:
        model = torch.compile(model)
    objective.prepare(run, raw_model, model, device, dtype)  # e.g. DPO's reference (never through DDP)
    if world > 1 and not sharded:
        model = wrap_ddp(model, device, local_rank)

    # 3. the run begins: rank 0 takes out_dir (old files go only now), the starting model is evaluated
    try:
        on_first_rank(lambda: start_run(run, objective, raw_model, per_step, max_iters), rank, world, device)
        run.bar = tqdm(total=max_iters, initial=run.step, disable=rank != 0, unit="step", dynamic_ncols=True)
        window, peak = Window(len(objective.stats), device), peak_flops(device, dtype)
        if run.step == 0:
            model_work(lambda: evaluate_and_save(run, objective, raw_model, optimizer, scaler, None), rank, world,
                       device, sharded)
        while run.step < max_iters:
            # 4. the learning rate of this step
            lr = learning_rate(run.step, config, max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # 5. this process's share of the step's items, in micro-batches of batch_size items
            items = objective.next_items(per_step)
            share = len(items) // world
            mine = items[rank * share:(rank + 1) * share]
            micro_batches = [(chunk, *objective.batch(chunk)) for chunk in (mine[i:i + B] for i in range(0, share, B))]
            # 6. every supervised token (or pair) of the step weighs the same, whichever process has it
            weight = torch.tensor(float(sum(objective.weight(chunk, y) for chunk, _, y in micro_batches)),
                                  device=device)
            if world > 1:
                torch.distributed.all_reduce(weight)
            scale = world / weight.clamp(min=1)
            # 7. forward and backward; DDP (FSDP) averages the gradients in the last micro-batch's backward
            for i, (chunk, x, y) in enumerate(micro_batches):
                supervised = np.flatnonzero(y >= 0)
                sync = world == 1 or i == len(micro_batches) - 1 or config["fsdp_reduce_every_micro_batch"]
                with gradient_sync(model, sync):
                    positions = to_device(supervised, device)
                    torch._dynamo.maybe_mark_dynamic(positions, 0)  # a new length every batch: one graph for all
                    with autocast(device, dtype):
                        loss, stats = objective.loss(model, chunk, to_device(x, device), to_device(y, device),
                                                     positions)
                    scaler.scale(loss * scale).backward()
                window.stats += stats
                window.tokens, window.supervised = window.tokens + x.size, window.supervised + len(supervised)
            # 8. clip, step, and clear the gradients
            if config["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad],
                                               config["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            window.weight, window.steps = window.weight + weight, window.steps + 1
            run.bar.update(1)
            # 9. log the window's means (every process takes part: they are summed over all)
            at_eval = run.step % config["eval_interval"] == 0 or run.step == max_iters
            if run.step % config["log_interval"] == 0 or at_eval:
                trim_cpu_memory()
                train_loss = log_window(run, objective, window, lr, raw_model.config, is_lora, peak)
            # 10. evaluate and save on rank 0 (FSDP: every rank); the others wait for its verdict (stop, go on, fail)
            if at_eval:
                rng_states = gather_rng_states(world)
                stop = model_work(lambda: evaluate_and_save(run, objective, raw_model, optimizer, scaler, rng_states,
                                                            train_loss), rank, world, device, sharded)
                window.start = time.perf_counter()  # evaluation time is not training throughput
                if stop == 1:
                    break
        run.bar.close()
        if rank == 0:
            finish(run, objective, raw_model)
    finally:
        if run.lock is not None:
            run.lock.release()
    return raw_model


def main(argv=None):
    config = load_train_config(argv)
    check_config(config)
    if config["plan"]:
        return print_plan(config)
    try:
        train(config)
    except BaseException:
        close_distributed()
        raise
    close_distributed(finished=True)


if __name__ == "__main__":
    run_cli(main)
    leave_torchrun_process()
