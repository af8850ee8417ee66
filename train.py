"""Fine-tune GPT-2 into a grafito chat model, fully or with LoRA (or train a small one from scratch).

    python train.py config/ruby_002.py                           # gpt2 124M on grafito-25k
    python train.py config/cpu_tiny.py                           # the whole loop on 2 CPU cores, minutes
    python train.py config/ruby_002.py --init_from=resume        # continue out_dir's last checkpoint
    torchrun --standalone --nproc_per_node=8 train.py config/obsidian_000.py   # DDP

The loss is taken only on supervised tokens (answers and their end-of-text; loss.py).
Batches are rows of whole conversations packed to block_size (data.py). The run folder
and its rules are checkpoint.py's. Options and defaults are DEFAULTS below
(python train.py --help lists them).

objective="dpo" trains on preference pairs instead (data.load_pairs): Direct Preference
Optimization against a reference model, the starting model itself. A LoRA run's reference
is the same model with its adapters switched off; full fine-tuning computes the reference
log-probabilities once, before the first step, into out_dir/reference_logps.pt. The loop,
checkpoints, resume, DDP and logging are the same; the batches and the step's loss differ.
"""

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import dpo
import lora
from common import (DTYPES, GrafitoError, autocast, check_memory, peak_flops, run_cli, training_flops,
                    training_memory, trim_cpu_memory)
from configurator import SEED, check_options, format_config, integer, invalid, load_config, not_empty, number, one_of
from distributed import close_distributed, gather_rng_states, on_first_rank, set_rng_state, setup_distributed, wrap_ddp
from loss import DPO_STATS, AnswerLogProbs, masked_val_loss
from model import GPT, GPTConfig
from optim import learning_rate, make_optimizer

DEFAULTS = dict(
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
    dataset="grafito25k",  # folder under data/ or a path to a prepared folder
    block_size=1024,
    batch_size=8,  # rows per micro-batch, per process (objective=dpo: pairs, two rows each)
    gradient_accumulation_steps=1,  # micro-batches per step over all processes (nanoGPT's meaning)
    tokens_per_step=0,  # > 0: choose gradient_accumulation_steps to reach this many tokens per step
    max_iters=1000,
    epochs=0.0,  # > 0: sets max_iters to this many passes over the packed training rows or pairs (the later wins)
    # objective: sft (cross-entropy of the answers) | dpo (preference pairs against the starting model)
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
    backend="auto",  # DDP backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
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
    "objective": one_of("sft", "dpo"), "beta": (lambda v: v > 0, "positive"),
    "label_smoothing": number(0.0, 0.5, high_open=True), "dpo_reference": one_of("auto", "stored"),
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


def lora_settings(config):
    targets = tuple(t.strip() for t in config["lora_targets"].split(",") if t.strip())
    return lora.LoRAConfig(r=config["lora_r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"], targets=targets)


def accumulation_steps(config, world):
    """Micro-batches per step over all processes, rounded up to a multiple of the process count."""
    if config["tokens_per_step"]:
        rows = config["batch_size"] * (2 if config.get("objective") == "dpo" else 1)  # a pair is two rows
        steps = math.ceil(config["tokens_per_step"] / (rows * config["block_size"]))
    else:
        steps = config["gradient_accumulation_steps"]
    return math.ceil(steps / world) * world


# ----------------------------------------------------------------------------- set-up pieces

def build_model(config, init_source, resume_state):
    """The model to train, LoRA applied when lora_r > 0 (or restored on resume)."""
    if resume_state is not None:  # a scratch run without biases was saved with zero biases: rebuilt without
        no_bias = {"bias": False} if resume_state["base_model"] == "scratch" and not config["bias"] else {}
        model = checkpoint.load_model(init_source, merge=False, dropout=config["dropout"], **no_bias)
    elif config["init_from"] == "scratch":
        model = GPT(scratch_config(config))
    else:  # a GPT-2 name, a hub id, a folder or an earlier run (its adapters folded in)
        model = checkpoint.load_model(init_source, dropout=config["dropout"])
        if config["lora_r"]:
            lora.apply_lora(model, lora_settings(config))
    if config["block_size"] > model.config.block_size:
        raise invalid("block_size", config["block_size"], f"at most the model's context ({model.config.block_size})")
    return model


def scratch_config(config):
    return GPTConfig(block_size=config["block_size"], n_layer=config["n_layer"], n_head=config["n_head"],
                     n_embd=config["n_embd"], dropout=config["dropout"], bias=config["bias"])


def to_device(array, device):
    """A host batch on the device; pinned and asynchronous on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ----------------------------------------------------------------------------- the run

def train(config):
    """Train as config says; returns the trained model (unwrapped)."""
    # ------------------------------------------------------------------ set-up: processes and device
    rank, local_rank, world, device, dtype = setup_distributed(config)
    master = rank == 0
    out_dir = Path(config["out_dir"]).expanduser()
    resume = config["init_from"] == "resume"
    is_dpo = config["objective"] == "dpo"

    # ------------------------------------------------------------------ set-up: the run folder, checked (nothing deleted yet)
    checkpoint.check_writable(out_dir)
    if resume:
        resume_state = checkpoint.load_train_state(out_dir)
        checkpoint.check_resume(resume_state, config)
        init_source = checkpoint.resolve(checkpoint.latest(out_dir))
        base_name, base_fingerprint = resume_state["base_model"], resume_state["base_fingerprint"]
    else:
        resume_state = None
        init_source = None if config["init_from"] == "scratch" else checkpoint.resolve(config["init_from"])
        checkpoint.check_new_run(out_dir, init_source, config["overwrite"])
        base_name = "scratch" if init_source is None else init_source.describe()
        base_fingerprint = None

    # ------------------------------------------------------------------ set-up: data
    if is_dpo:  # whole pairs, never packed: a row's log-probabilities must depend on it alone
        train_split, val_split = data.load_pairs(config["dataset"], "train"), data.load_pairs(config["dataset"], "val")
        sampler = data.PairBatches(train_split, config["block_size"], seed=config["seed"],
                                   length_group=dpo.PAIR_LENGTH_GROUP)
        per_epoch = train_split.num_pairs
        val_batches = (data.pair_eval_batches(val_split, config["block_size"], config["batch_size"],
                                              config["eval_iters"]) if val_split.num_pairs else [])
    else:
        train_split, val_split = data.load_split(config["dataset"], "train"), data.load_split(config["dataset"], "val")
        sampler = data.PackedBatches(train_split, config["block_size"], seed=config["seed"])
        per_epoch = len(sampler.rows_of_epoch(0))
        val_batches = (data.eval_batches(val_split, config["block_size"], config["batch_size"], config["eval_iters"])
                       if val_split.num_conversations else [])
    next_items = sampler.next_pairs if is_dpo else sampler.next_rows
    accum = accumulation_steps(config, world)
    if resume_state is not None and resume_state["accumulation"] != accum:
        raise GrafitoError(f"cannot resume: the run took {resume_state['accumulation']} micro-batches per step over "
                           f"{resume_state['world']} process(es); with {world} it would take {accum} (rounded to a "
                           f"multiple of the process count). Resume with {resume_state['world']} process(es)")
    per_step = config["batch_size"] * accum  # rows (sft) or pairs (dpo)
    max_iters = math.ceil(config["epochs"] * per_epoch / per_step) if config["epochs"] > 0 else config["max_iters"]

    # ------------------------------------------------------------------ set-up: model and optimizer
    advice = "choose a smaller model, batch_size or block_size"
    if config["init_from"] == "scratch":
        check_memory(training_memory(scratch_config(config), config["batch_size"], config["block_size"]), device,
                     "this model", advice)
    model = build_model(config, init_source, resume_state)
    rows_per_batch = config["batch_size"] * (2 if is_dpo else 1)  # a pair is two rows
    check_memory(training_memory(model.config, rows_per_batch, config["block_size"], lora=config["lora_r"] > 0),
                 device, "a training step", advice)
    for split in (train_split, val_split):
        data.check_token_ids(split.rows if is_dpo else split, model.config.vocab_size)
    is_lora = bool(lora.lora_layers(model))
    if is_lora and not resume:
        base_fingerprint = checkpoint.base_fingerprint(init_source)
    if is_lora and dtype in ("bfloat16", "float16"):
        lora.cast_frozen_linears(model, DTYPES[dtype])
    model.to(device)
    optimizer = make_optimizer(model, config["learning_rate"], config["weight_decay"],
                               (config["beta1"], config["beta2"]), device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    step, best_val, evals_without_gain = 0, float("inf"), 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        sampler.load_state_dict(resume_state["sampler"])
        step, best_val, evals_without_gain = resume_state["step"], resume_state["best_val"], resume_state["evals_without_gain"]
        if rank < len(resume_state["rng"]):  # a rank the saved run did not have keeps its fresh seed
            set_rng_state(resume_state["rng"][rank])
    raw_model = model
    if is_dpo:  # its forward gives each row's answer log-probability
        model = AnswerLogProbs(model)
    if config["compile"]:
        model = torch.compile(model)
    unsynced = model  # the reference's forward passes take no gradient: never through DDP
    if world > 1:
        model = wrap_ddp(model, device, local_rank)

    # ------------------------------------------------------------------ set-up: start the run (old files go only now)
    lock = None
    stored_reference = is_dpo and (not is_lora or config["dpo_reference"] == "stored")
    if resume and is_dpo and (resume_state.get("reference_fingerprint") is not None) != stored_reference:
        raise GrafitoError(f"cannot resume with a different dpo_reference (the run {'did not store' if stored_reference else 'stored'}"
                           f" its reference log-probabilities); resume with the run's own setting")
    reference_fingerprint = None  # a stored reference: what its log-probabilities were made from
    if stored_reference:
        reference_fingerprint = dpo.reference_fingerprint(resume_state, base_name, init_source, dtype, config["dataset"])

    def start():
        nonlocal lock
        lock = checkpoint.RunLock(out_dir)  # a second run into out_dir stops here, before it changes anything
        if not resume:
            checkpoint.clear_run(out_dir)
        checkpoint.remove_stale_saves(out_dir)
        (out_dir / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
        announce(config, raw_model, device, dtype, world, train_split, sampler, per_epoch, per_step, accum, max_iters,
                 len(val_batches))
        if reference_fingerprint is not None:
            dpo.store_reference(out_dir, reference_fingerprint, resume, raw_model, train_split, val_split,
                                config["block_size"], config["batch_size"], device, dtype)
        return 0

    on_first_rank(start, rank, world, device)
    try:
        # ------------------------------------------------------------------ set-up: the step's loss
        if is_dpo:  # the stored log-probabilities, or this model with its adapters off
            stored = dpo.load_reference(out_dir) if stored_reference else None
            reference = dpo.Reference(raw_model, unsynced, device, dtype, stored)

        def micro_step(items, x, y, supervised):
            """(the micro-batch's summed loss to minimise, the sums to log)"""
            if is_dpo:
                return dpo.step_loss(model(x, y, supervised), reference.rows(items, x, y, supervised), config["beta"],
                                     config["label_smoothing"])
            _, loss_sum = model(x, y, reduction="sum", supervised=supervised)
            return loss_sum, loss_sum.detach().float()[None]

        def validate():
            """Validation metrics by name (without the val_ prefix); 'loss' decides best/."""
            if is_dpo:
                return dpo.validate(raw_model, val_batches, reference.val(val_batches), config["beta"],
                                    config["label_smoothing"], device, dtype)
            val_loss = masked_val_loss(raw_model, val_batches, device, dtype)
            return {"loss": val_loss, "ppl": math.exp(min(val_loss, 50))}

        log = checkpoint.open_log(out_dir, step) if master else None
        peak = peak_flops(device, dtype)

        def evaluate_and_save(train_loss):
            """Rank 0: evaluate, write best/ (on improvement) then ckpt/; 1 means stop early."""
            nonlocal best_val, evals_without_gain
            improved = step > 0
            if val_batches:
                metrics = validate()
                val_loss = metrics["loss"]
                if not math.isfinite(val_loss):
                    raise GrafitoError(f"validation loss became {val_loss} at step {step}; stopped without saving")
                improved = step > 0 and val_loss < best_val  # step 0 is the starting model: a reference
                if improved:
                    best_val, evals_without_gain = val_loss, 0
                elif step > 0:
                    evals_without_gain += 1
                said = (dpo.describe(metrics) if is_dpo else
                        f"val loss {val_loss:.4f}, perplexity {metrics['ppl']:.2f}")
                bar.write(f"step {step}: {said}" + (f", train loss {train_loss:.4f}" if train_loss is not None else "")
                          + (" (best)" if improved else ""))
                log.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in metrics.items()},
                                      "time": time.time()}) + "\n")
                log.flush()
            if step > 0:
                state = {"format": checkpoint.STATE_FORMAT, "step": step, "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "sampler": sampler.state_dict(), "rng": rng_states,
                         "best_val": best_val, "evals_without_gain": evals_without_gain, "config": config,
                         "base_model": base_name, "base_fingerprint": base_fingerprint, "accumulation": accum, "world": world,
                         "reference_fingerprint": reference_fingerprint}
                if improved:
                    checkpoint.save_checkpoint(out_dir, checkpoint.BEST, raw_model, base_name, base_fingerprint)
                checkpoint.save_checkpoint(out_dir, checkpoint.LATEST, raw_model, base_name, base_fingerprint, state)
            patience = config["early_stop_patience"]
            if patience and evals_without_gain >= patience:
                bar.write(f"early stop: no better val loss in {patience} evaluations")
                return 1
            return 0

        # ------------------------------------------------------------------ the loop
        from tqdm import tqdm

        bar = tqdm(total=max_iters, initial=step, disable=not master, unit="step", dynamic_ncols=True)
        stat_names = DPO_STATS if is_dpo else ("loss",)
        window_stats, window_count, window_steps = torch.zeros(len(stat_names), device=device), 0, 0  # since last log
        window_tokens, window_supervised, window_start = 0, 0, time.perf_counter()  # this process's
        rng_states = None
        if step == 0:
            on_first_rank(lambda: evaluate_and_save(None), rank, world, device)
        stop = False
        while step < max_iters and not stop:
            # learning rate
            lr = learning_rate(step, config, max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # one optimizer step over this process's share of the step's rows (sft) or pairs (dpo)
            items = next_items(per_step)
            per_rank = len(items) // world
            mine = items[rank * per_rank:(rank + 1) * per_rank]
            batches = [(chunk, *sampler.batch(chunk)) for chunk in
                       (mine[i:i + config["batch_size"]] for i in range(0, len(mine), config["batch_size"]))]
            if is_dpo:
                count = torch.tensor(float(per_step), device=device)
            else:
                count = torch.tensor(float(sum(int((y >= 0).sum()) for _, _, y in batches)), device=device)
                if world > 1:
                    torch.distributed.all_reduce(count)
            scale = world / count.clamp(min=1)  # every supervised token (pair) weighs the same, wherever it landed
            for i, (chunk, x, y) in enumerate(batches):
                sync = model.no_sync() if world > 1 and i < len(batches) - 1 else nullcontext()
                supervised = np.flatnonzero(y >= 0)
                with sync:
                    positions = to_device(supervised, device)
                    torch._dynamo.maybe_mark_dynamic(positions, 0)  # a new length every batch: one graph for all
                    with autocast(device, dtype):
                        objective, stats = micro_step(chunk, to_device(x, device), to_device(y, device), positions)
                    scaler.scale(objective * scale).backward()
                window_stats += stats
                window_tokens, window_supervised = window_tokens + x.size, window_supervised + len(supervised)
            if config["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], config["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_count += count
            window_steps += 1
            bar.update(1)
            # log
            at_eval = step % config["eval_interval"] == 0 or step == max_iters
            if step % config["log_interval"] == 0 or at_eval:
                trim_cpu_memory()
                counts = torch.tensor([window_tokens, window_supervised], dtype=window_stats.dtype, device=device)
                total = torch.cat([window_stats, counts])
                if world > 1:
                    torch.distributed.all_reduce(total)
                total = total.tolist()
                means = {f"train_{name}": value / max(float(window_count), 1) for name, value in zip(stat_names, total)}
                train_loss = means["train_loss"]
                if not math.isfinite(train_loss):
                    raise GrafitoError(f"training loss became {train_loss} by step {step}; stopped, and the last good "
                                       f"checkpoint in {out_dir / checkpoint.LATEST} is untouched. Try a lower "
                                       f"learning_rate, grad_clip, or bfloat16 instead of float16")
                elapsed = time.perf_counter() - window_start
                if master:
                    tokens, supervised_count = total[-2], total[-1]  # all processes
                    rows = window_steps * per_step * (2 if is_dpo else 1)
                    flops = training_flops(raw_model.config, tokens, supervised_count, tokens / rows, lora=is_lora)
                    if is_dpo and not stored_reference:  # and the reference's forward: half a frozen model's fwd + bwd
                        flops += training_flops(raw_model.config, tokens, supervised_count, tokens / rows, lora=True) / 2
                    mfu = flops / world / elapsed / peak if peak else None  # per GPU, as nanoGPT reports it
                    shown = {"loss": f"{train_loss:.4f}"}
                    if is_dpo:
                        shown["acc"] = f"{means['train_reward_accuracy']:.0%}"
                    bar.set_postfix(**shown, lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:,.0f}",
                                    mfu=f"{mfu:.1%}" if mfu is not None else "unknown")
                    log.write(json.dumps({"step": step, **means, "lr": lr, "tokens_per_s": tokens / elapsed,
                                          "mfu": mfu, "time": time.time()}) + "\n")
                    log.flush()
                window_stats.zero_()
                window_count, window_steps, window_tokens, window_supervised = 0, 0, 0, 0
                window_start = time.perf_counter()
            # evaluate and save
            if at_eval:
                rng_states = gather_rng_states(world)
                stop = on_first_rank(lambda: evaluate_and_save(train_loss), rank, world, device) == 1
                window_start = time.perf_counter()  # evaluation time is not training throughput
        bar.close()

        # ------------------------------------------------------------------ finish
        if master:
            log.close()
            best = "no val split"
            if val_batches:
                best = (f"best val DPO loss {best_val:.4f}" if is_dpo else
                        f"best val loss {best_val:.4f} (perplexity {math.exp(min(best_val, 50)):.2f})")
            print(f"done: {step} steps, {best}; weights in {out_dir / checkpoint.BEST}")
            if is_lora and config["lora_merge"]:  # into a fresh float32 base, not the training copy
                merged = checkpoint.load_model(out_dir / checkpoint.BEST)
                checkpoint.save_checkpoint(out_dir, checkpoint.MERGED, merged)
                print(f"merged adapter into the base: {out_dir / checkpoint.MERGED}")
            if config["plot"]:
                plot_losses(out_dir, "DPO loss" if is_dpo else "cross-entropy")
    finally:
        if lock is not None:
            lock.release()
    return raw_model


def announce(config, model, device, dtype, world, train_split, sampler, per_epoch, per_step, accum, max_iters,
             n_val_batches):
    print("config:\n" + format_config(config))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {model.num_params() / 1e6:.1f}M parameters ({trainable / 1e6:.2f}M trainable"
          f"{', LoRA' if lora.lora_layers(model) else ''}), device {device}, dtype {dtype}, {world} process(es)")
    wanted = config["gradient_accumulation_steps"] if not config["tokens_per_step"] else None
    if wanted is not None and wanted != accum:
        print(f"note: {wanted} micro-batches per step rounded up to {accum}, a multiple of the {world} processes "
              f"(every process runs the same number)")
    no_val = "" if n_val_batches else " (no val split: evaluations only save, and best/ follows the latest)"
    if config["objective"] == "dpo":
        reference = ("this model with its adapters off" if lora.lora_layers(model) and config["dpo_reference"] == "auto"
                     else f"the starting model's log-probabilities ({dpo.REFERENCE_FILE})")
        print(f"data: {train_split.num_pairs:,} train pairs (a chosen and a rejected row each, at most "
              f"{int(train_split.row_lengths.max()):,} tokens), {n_val_batches} val batches{no_val}")
        print(f"objective: DPO, beta {config['beta']}, label smoothing {config['label_smoothing']}; reference: {reference}")
        print(f"steps: {max_iters:,} of {per_step} pairs (gradient accumulation {accum}) = "
              f"{max_iters * per_step / per_epoch:.2f} epochs")
        return
    print(f"data: {train_split.num_conversations:,} train conversations in {per_epoch:,} rows of "
          f"{config['block_size']} tokens ({sampler.packing_efficiency():.1%} filled), {n_val_batches} val batches{no_val}")
    cut, cut_tokens = sampler.overlong()
    if cut:
        print(f"note: {cut:,} train conversations are longer than a row ({config['block_size'] + 1} tokens) and lose "
              f"their last {cut_tokens:,} tokens ({cut_tokens / len(train_split.tokens):.1%} of the split); "
              f"prepare with --block_size={config['block_size']} to drop them or cut them at a turn boundary instead")
    print(f"steps: {max_iters:,} of {per_step} rows ({per_step * config['block_size']:,} tokens, gradient "
          f"accumulation {accum}) = {max_iters * per_step / per_epoch:.2f} epochs")


def plot_losses(out_dir, measure):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for out_dir/loss.png)")
        return
    rows = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    train_points = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val_points = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train (masked)")
    if val_points:
        ax.plot(*zip(*val_points), marker="o", label="val (masked)")
    ax.set_xlabel("step")
    ax.set_ylabel(measure)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "loss.png", dpi=120)
    print(f"loss curve: {Path(out_dir) / 'loss.png'}")


def main(argv=None):
    config = load_train_config(argv)
    check_config(config)
    try:
        train(config)
    finally:
        close_distributed()


if __name__ == "__main__":
    run_cli(main)
