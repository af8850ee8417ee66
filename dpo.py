"""DPO's reference model and its metrics: what train.py's objective="dpo" compares the policy with.

The reference is the model training started from. A LoRA run has it for free: the same model
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
from common import GrafitoError, eval_mode
from loss import DPO_STATS, dpo_loss, dpo_stats, pair_log_probs

REFERENCE_FILE = "reference_logps.pt"
PAIR_LENGTH_GROUP = 64  # pairs of similar length share a batch: less padding (docs/preference_tuning.md)


def reference_fingerprint(resume_state, base_name, init_source, dtype, dataset):
    """What full fine-tuning's stored reference is made from: model, its weights' digest, dtype, dataset."""
    made_from = (resume_state.get("reference_fingerprint") or {} if resume_state is not None else
                 {"model": base_name, "weights": checkpoint.base_fingerprint(init_source), "dtype": dtype})
    return {**made_from, "dataset": dataset_fingerprint(dataset)}


def dataset_fingerprint(dataset):
    """sha256 of a prepared dataset's token, mask and offset files, both splits."""
    folder = data.resolve_dataset(dataset)
    digest = hashlib.sha256()
    for split in data.SPLITS:
        for path in data.split_files(folder, split):
            if path.is_file():
                digest.update(path.name.encode())
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
    return digest.hexdigest()[:32]


def store_reference(out_dir, fingerprint, resume, model, train_split, val_split, block_size, batch_size, device, dtype):
    """Make sure out_dir/reference_logps.pt holds the reference log-probabilities `fingerprint`
    describes: kept when it does (a resume, or a new run on the same model and data), computed
    from model and written otherwise; a resume never recomputes (its reference is gone)."""
    path = out_dir / REFERENCE_FILE
    stored = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    found = stored.get("fingerprint", {}) if isinstance(stored, dict) else {}
    if found == fingerprint:
        print(f"reference: the starting model's log-probabilities in {path}")
        return
    if resume:
        differs = sorted(k for k in set(found) | set(fingerprint) if found.get(k) != fingerprint.get(k))
        raise GrafitoError(f"cannot resume: {path} " + ("is missing" if stored is None else
                           f"was made from another {' and '.join(differs)} than this run's") + " (the dataset changed "
                           "since the run started, or the file was replaced); start a new run")
    started = time.perf_counter()
    values = {"train": every_pair_log_probs(model, train_split, block_size, batch_size, device, dtype),
              # val batched as evaluations batch it: step 0's val rewards are exactly 0
              "val": pair_log_probs(model, data.pair_eval_batches(val_split, block_size, batch_size), device, dtype)[0]}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"fingerprint": fingerprint, **values}, tmp)
    os.replace(tmp, path)
    print(f"reference: the starting model's log-probabilities of {len(values['train']):,} train and "
          f"{len(values['val']):,} val pairs, {time.perf_counter() - started:.1f}s -> {path}")


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
    """Full fine-tuning's stored reference: {"train": (pairs, 2), "val": (pairs, 2)}, columns chosen and rejected."""
    stored = torch.load(Path(out_dir) / REFERENCE_FILE, map_location="cpu", weights_only=True)
    return {"train": stored["train"], "val": stored["val"]}


class Reference:
    """The reference's answer log-probabilities, for a training micro-batch (rows(): chosen rows,
    then rejected rows) and for the val pairs (val(): (pairs, 2)).

    LoRA (stored=None): model with its adapters switched off, through forward, the compiled but
    not DDP-wrapped callable returning each row's answer log-probability. Full fine-tuning:
    stored, load_reference's values."""

    def __init__(self, model, forward, device, dtype, stored=None):
        if stored is None and not lora.lora_layers(model):
            raise GrafitoError("a DPO reference needs LoRA adapters to switch off, or stored log-probabilities")
        self.model, self.forward, self.device, self.dtype, self.stored = model, forward, device, dtype, stored
        self.train = stored["train"].to(device) if stored is not None else None
        self.val_log_probs = stored.get("val") if stored is not None else None

    def rows(self, pairs, x, y, supervised):
        if self.stored is not None:
            chosen_rejected = self.train[torch.from_numpy(np.asarray(pairs)).to(self.device)]
            return torch.cat([chosen_rejected[:, 0], chosen_rejected[:, 1]])
        with torch.no_grad(), lora.adapters_off(self.model), eval_mode(self.model):  # eval mode: no dropout
            return self.forward(x, y, supervised)

    def val(self, val_batches):
        """The val pairs' values; a LoRA reference computes them at the first call (val_batches
        are the same at every evaluation) and keeps them."""
        if self.stored is not None and self.val_log_probs is None:
            raise GrafitoError("the stored reference holds no val log-probabilities")
        if self.val_log_probs is None:
            with lora.adapters_off(self.model):
                self.val_log_probs = pair_log_probs(self.model, val_batches, self.device, self.dtype)[0]
        return self.val_log_probs


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
