"""Supervised fine-tuning, train.py's objective="sft": the cross-entropy of the answers only.

A training item is a row of whole conversations packed to block_size + 1 tokens
(data.PackedBatches); the loss covers the supervised tokens (answers and their end-of-text),
each weighing the same wherever it lands, and the output layer runs only there (loss.py).
Validation is the masked val loss over the whole val split (or its first eval_iters batches).
"""

import math

import data
from loss import masked_val_loss
from objective import Objective


class SFT(Objective):
    name = "sft"

    def __init__(self, config):
        self.config = config
        self.train_split = data.load_split(config["dataset"], "train")
        self.val_split = data.load_split(config["dataset"], "val")
        self.sampler = data.PackedBatches(self.train_split, config["block_size"], seed=config["seed"])
        self.items_per_epoch = len(self.sampler.rows_of_epoch(0))
        self.val_batches = (data.eval_batches(self.val_split, config["block_size"], config["batch_size"],
                                              config["eval_iters"]) if self.val_split.num_conversations else [])

    def check_model(self, model):
        for split in (self.train_split, self.val_split):
            data.check_token_ids(split, model.config.vocab_size)

    def next_items(self, n):
        return self.sampler.next_rows(n)

    def batch(self, items):
        return self.sampler.batch(items)

    def weight(self, items, y):
        """What one micro-batch adds to the step's divisor: its supervised tokens."""
        return int((y >= 0).sum())

    def loss(self, module, items, x, y, supervised):
        """(the micro-batch's summed loss to minimise, the sums of `stats` to log)"""
        _, loss_sum = module(x, y, reduction="sum", supervised=supervised)
        return loss_sum, loss_sum.detach().float()[None]

    def validate(self, model, device, dtype):
        """Validation metrics by name (logged with a val_ prefix); 'loss' decides best/."""
        val_loss = masked_val_loss(model, self.val_batches, device, dtype)
        return {"loss": val_loss, "ppl": math.exp(min(val_loss, 50))}

    def describe(self, metrics):
        return f"val loss {metrics['loss']:.4f}, perplexity {metrics['ppl']:.2f}"

    def describe_best(self, best_val):
        return f"best val loss {best_val:.4f} (perplexity {math.exp(min(best_val, 50)):.2f})"

    def describe_data(self, per_step, accumulation, max_iters):
        block_size = self.config["block_size"]
        lines = [f"data: {self.train_split.num_conversations:,} train conversations in {self.items_per_epoch:,} rows "
                 f"of {block_size} tokens ({self.sampler.packing_efficiency():.1%} filled)"]
        cut, cut_tokens = self.sampler.overlong()
        if cut:
            lines.append(f"note: {cut:,} train conversations are longer than a row ({block_size + 1} tokens) and "
                         f"lose their last {cut_tokens:,} tokens ({cut_tokens / len(self.train_split.tokens):.1%} "
                         f"of the split); prepare with --block_size={block_size} to drop them or cut them at a "
                         f"turn boundary instead")
        lines.append(f"steps: {max_iters:,} of {per_step} rows ({per_step * block_size:,} tokens, gradient "
                     f"accumulation {accumulation}) = "
                     f"{max_iters * per_step / self.items_per_epoch:.2f} epochs")
        return lines
