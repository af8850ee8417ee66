"""Direct Preference Optimization, train.py's objective="dpo": the objective, its reference
model and its metrics.

A training item is a preference pair (data.PairBatches): two rows, the prompt with its chosen
and with its rejected answer, never packed with other text. The loss (loss.dpo_loss) compares
the policy's answer log-probabilities with the reference's. The reference is the model
training started from. A LoRA run has it for free: the same model
with its adapters switched off. Full fine-tuning changes every weight, so the starting model's
answer log-probabilities of every train and val pair are computed once, before the first step,
into out_dir/reference_logps.pt, with a fingerprint of the model, dtype and dataset that a
resume checks. The loss itself is loss.dpo_loss; docs/preference_tuning.md explains the whole.
"""

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import lora
from common import GrafitoError, eval_mode, training_flops
from loss import DPO_STATS, AnswerLogProbs, dpo_loss, dpo_stats, pair_log_probs
from objective import Objective, dataset_names

REFERENCE_FILE = "reference_logps.pt"
PAIR_LENGTH_GROUP = 64  # pairs of similar length share a batch: less padding (docs/preference_tuning.md)


def reference_fingerprint(resume_state, base_name, init_source, dtype, dataset):
    """What full fine-tuning's stored reference is made from: model, its weights' digest, dtype, dataset."""
    made_from = (resume_state.get("reference_fingerprint") or {} if resume_state is not None else
                 {"model": base_name, "weights": checkpoint.base_fingerprint(init_source), "dtype": dtype})
    return {**made_from, "dataset": "+".join(dataset_fingerprint(name) for name in dataset.split(",") if name.strip())}


def dataset_fingerprint(dataset):
    """sha256 of a prepared dataset's token, mask and offset files, both splits."""
    folder = data.resolve_dataset(dataset.strip())
    digest = hashlib.sha256()
    for split in data.SPLITS:
        for path in data.split_files(folder, split):
            if path.is_file():
                digest.update(path.name.encode())
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
    return digest.hexdigest()[:32]


def reference_needed(out_dir, fingerprint, resume):
    """Whether out_dir/reference_logps.pt must be computed: not when it holds the values
    `fingerprint` describes (a resume, or a new run on the same model and data); a resume never
    recomputes (its reference is gone), so there a missing or different file is an error."""
    path = out_dir / REFERENCE_FILE
    stored = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    found = stored.get("fingerprint", {}) if isinstance(stored, dict) else {}
    if found == fingerprint:
        return False
    if resume:
        differs = sorted(k for k in set(found) | set(fingerprint) if found.get(k) != fingerprint.get(k))
        raise GrafitoError(f"cannot resume: {path} " + ("is missing" if stored is None else
                           f"was made from another {' and '.join(differs)} than this run's") + " (the dataset changed "
                           "since the run started, or the file was replaced); start a new run")
    return True


def reference_values(model, train_splits, val_splits, block_size, batch_size, device, dtype):
    """The starting model's answer log-probabilities, one (pairs, 2) tensor per dataset:
    {"train": [...], "val": [...]}."""
    return {"train": [every_pair_log_probs(model, split, block_size, batch_size, device, dtype)
                      for split in train_splits],
            # val batched as evaluations batch it: step 0's val rewards are exactly 0
            "val": [pair_log_probs(model, data.pair_eval_batches(split, block_size, batch_size), device, dtype)[0]
                    for split in val_splits]}


def store_reference(out_dir, fingerprint, resume, model, train_splits, val_splits, block_size, batch_size, device,
                    dtype, values=None):
    """Make sure out_dir/reference_logps.pt holds the reference log-probabilities `fingerprint`
    describes: kept when it does, else written from values (reference_values, computed from model
    when not given). One dataset's values are stored as tensors; a mixture's as lists of them."""
    path = out_dir / REFERENCE_FILE
    if not reference_needed(out_dir, fingerprint, resume):
        print(f"reference: the starting model's log-probabilities in {path}")
        return
    started = time.perf_counter()
    if values is None:
        values = reference_values(model, train_splits, val_splits, block_size, batch_size, device, dtype)
    train, val = values["train"], values["val"]
    one = len(train) == 1
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"fingerprint": fingerprint, "train": train[0] if one else train, "val": val[0] if one else val}, tmp)
    os.replace(tmp, path)
    print(f"reference: the starting model's log-probabilities of {sum(map(len, train)):,} train and "
          f"{sum(map(len, val)):,} val pairs, {time.perf_counter() - started:.1f}s -> {path}")


def every_pair_log_probs(model, split, block_size, batch_size, device, dtype):
    """(num_pairs, 2) float32: every pair's answer log-probabilities, pair i in row i, computed
    in batches of batch_size pairs taken longest first (little padding)."""
    if not split.num_pairs:
        return torch.zeros(0, 2)
    batcher = data.PairBatches(split, block_size, shuffle=False)
    order = np.argsort(-split.row_lengths.max(axis=1), kind="stable")
    batches = [(pairs, *batcher.batch(pairs)) for pairs in np.split(order, range(batch_size, len(order), batch_size))]
    by_pair = torch.empty(split.num_pairs, 2)
    by_pair[torch.from_numpy(order)] = pair_log_probs(model, batches, device, dtype)[0]
    return by_pair


def load_reference(out_dir):
    """Full fine-tuning's stored reference: {"train": (pairs, 2), "val": (pairs, 2)}, columns chosen
    and rejected (a mixture's: lists of them, one per dataset)."""
    stored = torch.load(Path(out_dir) / REFERENCE_FILE, map_location="cpu", weights_only=True)
    return {"train": stored["train"], "val": stored["val"]}


def per_dataset(values):
    """A stored reference's values as a list, one per dataset (one dataset's are stored bare)."""
    return values if isinstance(values, (list, tuple)) else [values]


class Reference:
    """The reference's answer log-probabilities, for a training micro-batch (rows(): chosen rows,
    then rejected rows) and for a dataset's val pairs (val(): (pairs, 2)).

    LoRA (stored=None): model with its adapters switched off, through forward, the compiled but
    not DDP-wrapped callable returning each row's answer log-probability (with FSDP it runs
    the sharded model, every rank taking part). Full fine-tuning: stored, load_reference's
    values, or the run folder holding them (read at the first use).
    Items are pair indices, or (dataset, pair) for a mixture of datasets."""

    def __init__(self, model, forward, device, dtype, stored=None):
        if stored is None and not lora.lora_layers(model):
            raise GrafitoError("a DPO reference needs LoRA adapters to switch off, or stored log-probabilities")
        self.model, self.forward, self.device, self.dtype = model, forward, device, dtype
        self._stored, self.train, self.starts, self.val_log_probs = stored, None, None, {}

    @property
    def stored(self):
        if isinstance(self._stored, (str, Path)):
            self._stored = load_reference(self._stored)
        return self._stored

    def rows(self, pairs, x, y, supervised):
        if self.stored is not None:
            if self.train is None:  # every dataset's pairs in one tensor, dataset d's from starts[d]
                train = per_dataset(self.stored["train"])
                self.train = torch.cat(train).to(self.device)
                self.starts = np.cumsum([0] + [len(t) for t in train[:-1]])
            mixed = len(pairs) and isinstance(pairs[0], tuple)  # (dataset, pair) items of a mixture
            index = np.asarray([self.starts[d] + p for d, p in pairs] if mixed else pairs, dtype=np.int64)
            chosen_rejected = self.train[torch.from_numpy(index).to(self.device)]
            return torch.cat([chosen_rejected[:, 0], chosen_rejected[:, 1]])
        with torch.no_grad(), lora.adapters_off(self.model), eval_mode(self.model):  # eval mode: no dropout
            return self.forward(x, y, supervised)

    def val(self, val_batches, dataset=0):
        """Dataset `dataset`'s val pairs' values; a LoRA reference computes them at the first call
        (val_batches are the same at every evaluation) and keeps them."""
        if dataset not in self.val_log_probs and self.stored is not None:
            values = self.stored.get("val")
            if values is None:
                raise GrafitoError("the stored reference holds no val log-probabilities")
            self.val_log_probs[dataset] = per_dataset(values)[dataset]
        if dataset not in self.val_log_probs:
            with lora.adapters_off(self.model):
                self.val_log_probs[dataset] = pair_log_probs(self.model, val_batches, self.device, self.dtype)[0]
        return self.val_log_probs[dataset]


def step_loss(policy_rows, reference_rows, beta, label_smoothing):
    """(the micro-batch's summed DPO loss, its DPO_STATS sums); rows are chosen ones, then rejected."""
    n = len(policy_rows) // 2
    losses, chosen, rejected = dpo_loss(policy_rows[:n], policy_rows[n:], reference_rows[:n], reference_rows[n:],
                                        beta, label_smoothing)
    return losses.sum(), dpo_stats(losses, chosen, rejected)


def validate(model, val_batches, reference_val, beta, label_smoothing, device, dtype):
    """The val split's DPO_STATS means by name; 'loss' decides best/."""
    policy = pair_log_probs(model, val_batches, device, dtype)[0]
    reference = reference_val[:len(policy)]
    losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta,
                                        label_smoothing)
    return dict(zip(DPO_STATS, (dpo_stats(losses, chosen, rejected) / len(losses)).tolist()))


def describe(metrics):
    return (f"val DPO loss {metrics['loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.1%}, margin "
            f"{metrics['reward_margin']:.3f} (chosen {metrics['chosen_reward']:+.3f}, rejected "
            f"{metrics['rejected_reward']:+.3f})")


class DPO(Objective):
    name, stats, measure, rows_per_item = "dpo", DPO_STATS, "DPO loss", 2  # a pair is two rows
    resume_keys = ("beta", "label_smoothing", "dpo_reference")  # they change what the loss means

    def __init__(self, config):
        self.config, self.names = config, dataset_names(config)
        self.train_splits = [data.load_pairs(name, "train") for name in self.names]
        self.val_splits = [data.load_pairs(name, "val") for name in self.names]
        # whole pairs, never packed: a row's log-probabilities must depend on it alone
        samplers = [data.PairBatches(split, config["block_size"], seed=config["seed"], length_group=PAIR_LENGTH_GROUP)
                    for split in self.train_splits]
        self.sizes = [split.num_pairs for split in self.train_splits]
        self.mix(config, samplers, self.sizes)
        self.val_sets = {name: data.pair_eval_batches(split, config["block_size"], config["batch_size"],
                                                      config["eval_iters"])
                         for name, split in zip(self.names, self.val_splits) if split.num_pairs}
        self.reference, self.fingerprint, self.lora, self.values = None, None, False, None

    def check_model(self, model):
        for split in self.train_splits + self.val_splits:
            data.check_token_ids(split.rows, model.config.vocab_size)

    def trained_module(self, model):
        return AnswerLogProbs(model)  # its forward gives each row's answer log-probability

    def prepare(self, run, model, forward, device, dtype):
        """The reference: this model with its adapters off (LoRA, dpo_reference=auto), or the
        starting model's stored log-probabilities, described by a fingerprint a resume checks."""
        self.lora = bool(lora.lora_layers(model))
        stored = not self.lora or self.config["dpo_reference"] == "stored"
        resume_state = run.resume_state
        if resume_state is not None and (resume_state.get("reference_fingerprint") is not None) != stored:
            raise GrafitoError(f"cannot resume with a different dpo_reference (the run "
                               f"{'did not store' if stored else 'stored'} its reference log-probabilities); "
                               f"resume with the run's own setting")
        if stored:
            self.fingerprint = reference_fingerprint(resume_state, run.base_name, run.init_source, dtype,
                                                     self.config["dataset"])
        self.reference = Reference(model, forward, device, dtype, stored=run.out_dir if stored else None)
        if stored and run.config.get("fsdp") and reference_needed(run.out_dir, self.fingerprint, run.resume):
            # a sharded model's forward passes need every rank: all compute now, rank 0 writes in start()
            self.values = reference_values(model, self.train_splits, self.val_splits, self.config["block_size"],
                                           self.config["batch_size"], device, dtype)

    def start(self, out_dir, resume):
        if self.fingerprint is not None:
            store_reference(out_dir, self.fingerprint, resume, self.reference.model, self.train_splits,
                            self.val_splits, self.config["block_size"], self.config["batch_size"],
                            self.reference.device, self.reference.dtype, self.values)

    def run_state(self):
        return {"reference_fingerprint": self.fingerprint}

    def weight(self, items, y):
        """Every pair weighs the same, however long its answers."""
        return len(items)

    def loss(self, module, items, x, y, supervised):
        return step_loss(module(x, y, supervised), self.reference.rows(items, x, y, supervised),
                         self.config["beta"], self.config["label_smoothing"])

    def validate(self, model, device, dtype):
        return self.combine({name: validate(model, batches, self.reference.val(batches, self.names.index(name)),
                                            self.config["beta"], self.config["label_smoothing"], device, dtype)
                             for name, batches in self.val_sets.items()})

    def describe(self, metrics):
        return describe(metrics)

    def describe_best(self, best_val):
        return f"best val DPO loss {best_val:.4f}"

    def flops(self, model_config, tokens, supervised, rows, lora):
        flops = training_flops(model_config, tokens, supervised, tokens / rows, lora=lora)
        if self.fingerprint is None:  # and the reference's forward: half a frozen model's forward and backward
            flops += training_flops(model_config, tokens, supervised, tokens / rows, lora=True) / 2
        return flops

    def describe_data(self, per_step, accumulation, max_iters):
        reference = ("this model with its adapters off" if self.fingerprint is None
                     else f"the starting model's log-probabilities ({REFERENCE_FILE})")
        longest = max(int(split.row_lengths.max()) for split in self.train_splits)
        return [f"data: {self.items_per_epoch:,} train pairs (a chosen and a rejected row each, at most "
                f"{longest:,} tokens)", *self.describe_mixture("pairs", self.sizes),
                f"objective: DPO, beta {self.config['beta']}, label smoothing {self.config['label_smoothing']}; "
                f"reference: {reference}",
                f"steps: {max_iters:,} of {per_step} pairs (gradient accumulation {accumulation}) = "
                f"{max_iters * per_step / self.items_per_epoch:.2f} epochs"]
