"""The optimizer and learning-rate schedule train.py uses (and bench.py times)."""

import math

import torch


def make_optimizer(model, learning_rate, weight_decay, betas, device, fused=True):
    """AdamW over the trainable parameters; matrices decay, biases and LayerNorms do not.
    PyTorch's fused kernel (one kernel for the whole update) on CUDA and CPUs, unless fused=False
    (sharded float16 training: the fused kernel cannot take the sharded grad scaler's verdict)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = fused and device.startswith(("cuda", "cpu"))
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def learning_rate(step, config, max_iters):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (or max_iters), or constant."""
    lr, warmup = config["learning_rate"], config["warmup_iters"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if config["lr_schedule"] == "constant":
        return lr
    decay_iters = config["lr_decay_iters"] or max_iters
    if step >= decay_iters:
        return config["min_lr"]
    progress = (step - warmup) / max(1, decay_iters - warmup)
    return config["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - config["min_lr"])
