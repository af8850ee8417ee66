"""What a training run reports as it goes: what it will do (announce), the sums of a log window
(summed over processes), the progress bar's figures (loss, lr, tokens/s, MFU), and log.jsonl's
rows (one per logged step and per evaluation; checkpoint.open_log opens the file,
checkpoint.plot_log draws it)."""

import json
import math
import time

import torch

import checkpoint
import lora
from common import GrafitoError
from configurator import format_config


def announce(run, objective, model, per_step, max_iters):
    """Rank 0, as the run starts: its config, model, processes, data and steps."""
    config = run.config
    print("config:\n" + format_config(config))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {model.num_params() / 1e6:.1f}M parameters ({trainable / 1e6:.2f}M trainable"
          f"{', LoRA' if lora.lora_layers(model) else ''}), device {run.device}, dtype {run.dtype}, "
          f"{run.world} process(es){', sharded (FSDP)' if config.get('fsdp') else ''}"
          f"{', activation checkpointing' if config.get('activation_checkpointing') else ''}")
    wanted = config["gradient_accumulation_steps"] if not config["tokens_per_step"] else None
    if wanted is not None and wanted != run.accumulation:
        print(f"note: {wanted} micro-batches per step rounded up to {run.accumulation}, a multiple of the "
              f"{run.world} processes (every process runs the same number)")
    for line in objective.describe_data(per_step, run.accumulation, max_iters):
        print(line)
    n_val = sum(len(batches) for batches in objective.val_sets.values())
    print(f"val: {n_val} batches" if n_val else
          "val: none (no val split: evaluations only save, and best/ follows the latest)")


def write_log(run, row):
    run.log.write(json.dumps({**row, "time": time.time()}) + "\n")
    run.log.flush()


class Window:
    """What this process did since the last log line: the objective's summed stats, the items'
    weight (over all processes), tokens, supervised tokens, steps, and when it began."""

    def __init__(self, n_stats, device):
        self.stats = torch.zeros(n_stats, device=device)
        self.restart()

    def restart(self):
        self.stats.zero_()
        self.weight, self.steps, self.tokens, self.supervised = 0, 0, 0, 0
        self.start = time.perf_counter()


def log_window(run, objective, window, lr, model_config, is_lora, peak):
    """Every process: the window's means over all processes, checked finite; rank 0 logs them
    with tokens/s and MFU. Returns the mean train loss."""
    counts = torch.tensor([window.tokens, window.supervised], dtype=window.stats.dtype, device=run.device)
    total = torch.cat([window.stats, counts])
    if run.world > 1:
        torch.distributed.all_reduce(total)
    total = total.tolist()
    means = {f"train_{name}": value / max(float(window.weight), 1) for name, value in zip(objective.stats, total)}
    train_loss = means["train_loss"]
    if not math.isfinite(train_loss):
        raise GrafitoError(f"training loss became {train_loss} by step {run.step}; stopped, and the last good "
                           f"checkpoint in {run.out_dir / checkpoint.LATEST} is untouched. Try a lower "
                           f"learning_rate, grad_clip, or bfloat16 instead of float16")
    elapsed = time.perf_counter() - window.start
    if run.rank == 0:
        tokens, supervised = total[-2], total[-1]  # all processes
        rows = window.steps * run.config["batch_size"] * run.accumulation * objective.rows_per_item
        flops = objective.flops(model_config, tokens, supervised, rows, is_lora)
        mfu = flops / run.world / elapsed / peak if peak else None  # per GPU, as nanoGPT reports it
        shown = {"loss": f"{train_loss:.4f}"}
        if "train_reward_accuracy" in means:
            shown["acc"] = f"{means['train_reward_accuracy']:.0%}"
        run.bar.set_postfix(**shown, lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:,.0f}",
                            mfu=f"{mfu:.1%}" if mfu is not None else "unknown")
        write_log(run, {"step": run.step, **means, "lr": lr, "tokens_per_s": tokens / elapsed, "mfu": mfu})
    window.restart()
    return train_loss
