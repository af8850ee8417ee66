"""What train.py trains for: the interface every objective offers the training loop.

An objective owns its data and its loss, so that train.py's loop never asks which one it runs:

    next_items(n), batch(items) -> (x, y)   the next n training items and their arrays
    weight(items, y)                        what a micro-batch adds to the step's divisor
    loss(module, items, x, y, supervised)   (summed loss to minimise, summed stats to log)
    validate(model, device, dtype)          {"loss": ..., ...}; "loss" decides best/
    describe(metrics), describe_best(loss), describe_data(per_step, accumulation, max_iters)
    check_model(model), trained_module(model), prepare(...), start(...), run_state()
    state_dict(), load_state_dict(state)    the data position: a resume continues it exactly

sft.SFT fine-tunes on the answers of chat conversations, dpo.DPO on preference pairs.
The base class below holds what they share.
"""

from common import training_flops


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
