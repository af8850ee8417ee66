"""Language modelling, train.py's objective="lm": next-token prediction on every token of a text
dataset, how GPT-2 itself was trained and how a "native" model is trained from scratch.

A training item is a window of block_size + 1 consecutive tokens at a random place of the
corpus (data.TextWindows: the shards are read lazily, whatever their size); every token but
the first is a target, each weighing the same. Validation is the loss over the val split's
consecutive windows (the first eval_iters batches of them, or all).
"""

import math

import data
from common import GrafitoError
from loss import masked_val_loss
from objective import Objective


class LM(Objective):
    name, measure = "lm", "cross-entropy, every token"

    def __init__(self, config):
        self.config = config
        self.train_split = data.load_text(config["dataset"], "train")
        self.val_split = data.load_text(config["dataset"], "val")
        self.sampler = data.TextWindows(self.train_split, config["block_size"], seed=config["seed"])
        self.items_per_epoch = max(self.train_split.num_tokens // config["block_size"], 1)  # windows' worth of targets
        has_val = self.val_split.num_tokens > config["block_size"]
        self.val_batches = (data.TextEvalBatches(self.val_split, config["block_size"], config["batch_size"],
                                                 config["eval_iters"]) if has_val else [])

    def check_model(self, model):
        for split in (self.train_split, self.val_split):
            if split.max_token_id >= model.config.vocab_size:
                raise GrafitoError(f"the {split.name} split holds token id {split.max_token_id}, but the model has "
                                   f"only {model.config.vocab_size} token embeddings; was it prepared with another "
                                   f"tokenizer?")

    def next_items(self, n):
        return self.sampler.next_windows(n)

    def batch(self, items):
        return self.sampler.batch(items)

    def weight(self, items, y):
        return y.size  # every token is a target

    def loss(self, module, items, x, y, supervised):
        _, loss_sum = module(x, y, reduction="sum", supervised=supervised)
        return loss_sum, loss_sum.detach().float()[None]

    def validate(self, model, device, dtype):
        val_loss = masked_val_loss(model, self.val_batches, device, dtype)
        return {"loss": val_loss, "ppl": math.exp(min(val_loss, 50))}

    def describe(self, metrics):
        return f"val loss {metrics['loss']:.4f}, perplexity {metrics['ppl']:.2f}"

    def describe_best(self, best_val):
        return f"best val loss {best_val:.4f} (perplexity {math.exp(min(best_val, 50)):.2f})"

    def describe_data(self, per_step, accumulation, max_iters):
        split, block_size = self.train_split, self.config["block_size"]
        tokens = max_iters * per_step * block_size
        return [f"data: {split.documents:,} train documents, {split.num_tokens:,} tokens in {len(split.shards)} "
                f"shard(s), read as random windows of {block_size + 1} tokens",
                f"steps: {max_iters:,} of {per_step} windows ({per_step * block_size:,} tokens, gradient accumulation "
                f"{accumulation}) = {tokens:,} tokens, {tokens / max(split.num_tokens, 1):.2f} epochs"]
