"""What a training run reports as it goes: the sums of a log window (summed over processes),
the progress bar's figures (loss, lr, tokens/s, MFU), and log.jsonl's rows (one per logged step
and per evaluation; checkpoint.open_log opens the file, checkpoint.plot_log draws it)."""

import json
import math
import time

import torch

import checkpoint
from common import GrafitoError


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
