"""What train.py trains for: the interface every objective offers the training loop.

An objective owns its data and its loss, so that train.py's loop never asks which one it runs:

    next_items(n), batch(items) -> (x, y)   the next n training items and their arrays
    weight(items, y)                        what a micro-batch adds to the step's divisor
    loss(module, items, x, y, supervised)   (summed loss to minimise, summed stats to log)
    validate(model, device, dtype)          {"loss": ..., ...}; "loss" decides best/
    val_sets                                {dataset name: val batches}, the datasets that have a val split
    describe(metrics), describe_best(loss), describe_data(per_step, accumulation, max_iters)
    check_model(model), trained_module(model), prepare(...), start(...), run_state()
    state_dict(), load_state_dict(state)    the data position: a resume continues it exactly

sft.SFT fine-tunes on the answers of chat conversations, dpo.DPO on preference pairs, lm.LM
trains on every token of plain text. Each reads one dataset or a weighted mixture of several
of its kind (dataset="a,b", dataset_weights="3,1"; data.Mixture), validates each dataset apart
and decides best/ by their weighted mean. The base class below holds what they share.
"""

import numpy as np

import data
from common import training_flops
from configurator import invalid


def dataset_names(config):
    """The datasets config names: dataset="a" or a mixture "a,b,c"."""
    names = [name.strip() for name in config["dataset"].split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise invalid("dataset", config["dataset"], "each dataset named once")
    return names


def mixture_weights(config, names, sizes):
    """Each dataset's share of the training items: dataset_weights, or in proportion to the
    datasets' sizes (as if they were one) when it is empty."""
    text = config.get("dataset_weights", "")
    if not text:
        return [size / sum(sizes) for size in sizes]
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(names) or any(not np.isfinite(w) or w <= 0 for w in weights):
        raise invalid("dataset_weights", text, f"{len(names)} positive numbers, one per dataset "
                                               f"({', '.join(names)}), comma-separated")
    return [w / sum(weights) for w in weights]


class Objective:
    """What every objective shares: the sampler's position is its state, and nothing is done
    before the first step. Subclasses set the class attributes and the data."""

    name = ""
    stats = ("loss",)  # the summed values loss() returns, logged as train_<name>; the first is the loss
    measure = "cross-entropy"  # what the logged loss is (loss.png's axis)
    rows_per_item = 1  # rows of block_size tokens a training item occupies
    resume_keys = ()  # options, beyond checkpoint.RESUME_FIXED, that a resume must not change

    def prepare(self, run, model, forward, device, dtype):
        """Every process, after the model is built: what the loss needs besides the model."""

    def start(self, out_dir, resume):
        """Rank 0, once the run folder is the run's: work to do before the first step."""

    def run_state(self):
        """What the checkpoint's train state keeps for this objective (a resume reads it back)."""
        return {}

    def trained_module(self, model):
        """The module whose forward loss() calls (compiled and DDP-wrapped by train.py)."""
        return model

    def flops(self, model_config, tokens, supervised, rows, lora):
        return training_flops(model_config, tokens, supervised, tokens / rows, lora=lora)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)

    def mix(self, config, samplers, sizes):
        """One dataset's sampler, or a Mixture of several; sets items_per_epoch and the weights."""
        self.weights = mixture_weights(config, self.names, sizes)
        self.items_per_epoch = sum(sizes)
        self.sampler = samplers[0] if len(samplers) == 1 else data.Mixture(samplers, self.weights, config["seed"])

    def next_items(self, n):
        return self.sampler.next_items(n)

    def batch(self, items):
        return self.sampler.batch(items)

    def combine(self, metrics):
        """{name: metrics} of the datasets with a val split -> the run's metrics: one dataset's own;
        for several, each metric's mean weighted by the datasets' weights, then every dataset's
        metrics as <metric>_<dataset>."""
        if len(metrics) == 1:
            return next(iter(metrics.values()))
        weight = {name: self.weights[self.names.index(name)] for name in metrics}
        total = sum(weight.values())
        keys = next(iter(metrics.values()))
        mean = {key: sum(weight[name] * m[key] for name, m in metrics.items()) / total for key in keys}
        return {**mean, **{f"{key}_{data.short_name(name)}": m[key] for name, m in metrics.items() for key in m}}

    def describe_mixture(self, item, sizes):
        """The mixture's line for describe_data (nothing for one dataset)."""
        if len(self.names) == 1:
            return []
        return ["mixture: " + ", ".join(f"{data.short_name(name)} {w:.0%} ({size:,} {item})"
                                        for name, w, size in zip(self.names, self.weights, sizes))]
