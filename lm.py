"""Language modelling, train.py's objective="lm": next-token prediction on every token of a text
dataset, how GPT-2 itself was trained and how a "native" model is trained from scratch.

A training item is a window of block_size + 1 consecutive tokens at a random place of the
corpus (data.TextWindows: the shards are read lazily, whatever their size); every token but
the first is a target, each weighing the same. Validation is the loss over the val split's
consecutive windows (the first eval_iters batches of them, or all).
"""

import data
from common import GrafitoError
from objective import dataset_names
from sft import SFT


class LM(SFT):
    """SFT's loss and validation, with every token a target: only the data differs."""
    name, measure = "lm", "cross-entropy, every token"

    def __init__(self, config):
        self.config, self.names = config, dataset_names(config)
        self.train_splits = [data.load_text(name, "train") for name in self.names]
        self.val_splits = [data.load_text(name, "val") for name in self.names]
        samplers = [data.TextWindows(split, config["block_size"], seed=config["seed"]) for split in self.train_splits]
        self.sizes = [max(split.num_tokens // config["block_size"], 1) for split in self.train_splits]  # windows' worth
        self.mix(config, samplers, self.sizes)
        self.val_sets = {name: data.TextEvalBatches(split, config["block_size"], config["batch_size"],
                                                    config["eval_iters"])
                         for name, split in zip(self.names, self.val_splits) if split.num_tokens > config["block_size"]}

    def check_model(self, model):
        for split in self.train_splits + self.val_splits:
            if split.max_token_id >= model.config.vocab_size:
                raise GrafitoError(f"the {split.name} split holds token id {split.max_token_id}, but the model has "
                                   f"only {model.config.vocab_size} token embeddings; was it prepared with another "
                                   f"tokenizer?")

    def weight(self, items, y):
        return y.size  # every token is a target

    def describe_data(self, per_step, accumulation, max_iters):
        block_size, splits = self.config["block_size"], self.train_splits
        tokens, total = max_iters * per_step * block_size, sum(split.num_tokens for split in splits)
        return [f"data: {sum(s.documents for s in splits):,} train documents, {total:,} tokens in "
                f"{sum(len(s.shards) for s in splits)} shard(s), read as random windows of {block_size + 1} tokens",
                *self.describe_mixture("windows", self.sizes),
                f"steps: {max_iters:,} of {per_step} windows ({per_step * block_size:,} tokens, gradient accumulation "
                f"{accumulation}) = {tokens:,} tokens, {tokens / max(total, 1):.2f} epochs"]
