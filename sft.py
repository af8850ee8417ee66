"""Supervised fine-tuning, train.py's objective="sft": the cross-entropy of the answers only.

A training item is a row of whole conversations packed to block_size + 1 tokens
(data.PackedBatches); the loss covers the supervised tokens (answers and their end-of-text),
each weighing the same wherever it lands, and the output layer runs only there (loss.py).
Validation is the masked val loss over the whole val split (or its first eval_iters batches).
"""

import math

import data
from loss import masked_val_loss
from objective import Objective, dataset_names


class SFT(Objective):
    name = "sft"

    def __init__(self, config):
        self.config, self.names = config, dataset_names(config)
        self.train_splits = [data.load_split(name, "train") for name in self.names]
        self.val_splits = [data.load_split(name, "val") for name in self.names]
        samplers = [data.PackedBatches(split, config["block_size"], seed=config["seed"]) for split in self.train_splits]
        self.sizes = [len(sampler.rows_of_epoch(0)) for sampler in samplers]
        self.samplers = samplers
        self.mix(config, samplers, self.sizes)
        self.val_sets = {name: data.eval_batches(split, config["block_size"], config["batch_size"], config["eval_iters"])
                         for name, split in zip(self.names, self.val_splits) if split.num_conversations}

    def check_model(self, model):
        for split in self.train_splits + self.val_splits:
            data.check_token_ids(split, model.config.vocab_size)

    def weight(self, items, y):
        """What one micro-batch adds to the step's divisor: its supervised tokens."""
        return int((y >= 0).sum())

    def loss(self, module, items, x, y, supervised):
        """(the micro-batch's summed loss to minimise, the sums of `stats` to log)"""
        _, loss_sum = module(x, y, reduction="sum", supervised=supervised)
        return loss_sum, loss_sum.detach().float()[None]

    def validate(self, model, device, dtype):
        """Validation metrics by name (logged with a val_ prefix); 'loss' decides best/."""
        metrics = self.combine({name: {"loss": masked_val_loss(model, batches, device, dtype)}
                                for name, batches in self.val_sets.items()})
        return {**metrics, "ppl": math.exp(min(metrics["loss"], 50))}

    def describe(self, metrics):
        each = [f"{data.short_name(n)} {metrics['loss_' + data.short_name(n)]:.4f}" for n in self.val_sets
                if f"loss_{data.short_name(n)}" in metrics]
        return (f"val loss {metrics['loss']:.4f}" + (f" ({', '.join(each)})" if each else "")
                + f", perplexity {metrics['ppl']:.2f}")

    def describe_best(self, best_val):
        return f"best val loss {best_val:.4f} (perplexity {math.exp(min(best_val, 50)):.2f})"

    def describe_data(self, per_step, accumulation, max_iters):
        block_size = self.config["block_size"]
        conversations = sum(split.num_conversations for split in self.train_splits)
        filled = sum(s.packing_efficiency() * n for s, n in zip(self.samplers, self.sizes)) / sum(self.sizes)
        lines = [f"data: {conversations:,} train conversations in {self.items_per_epoch:,} rows of {block_size} "
                 f"tokens ({filled:.1%} filled)", *self.describe_mixture("rows", self.sizes)]
        for name, split, sampler in zip(self.names, self.train_splits, self.samplers):
            cut, cut_tokens = sampler.overlong()
            if cut:
                lines.append(f"note: {cut:,} train conversations of {data.short_name(name)} are longer than a row "
                             f"({block_size + 1} tokens) and lose their last {cut_tokens:,} tokens "
                             f"({cut_tokens / len(split.tokens):.1%} of the split); prepare with "
                             f"--block_size={block_size} to drop them or cut them at a turn boundary instead")
        lines.append(f"steps: {max_iters:,} of {per_step} rows ({per_step * block_size:,} tokens, gradient "
                     f"accumulation {accumulation}) = {max_iters * per_step / self.items_per_epoch:.2f} epochs")
        return lines
