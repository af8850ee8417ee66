"""TRL's DPOTrainer beside grafito's DPO step (bench.py --rows=dpo --compare=trl), on
transformers' GPT-2 of the same shape and batch, in its own process; and a check that TRL's DPO
loss on the batch equals grafito's with the same policy and reference weights."""

import numpy as np
import torch

import dpo
import tokenizer
from benchmarks.measure import timed
from benchmarks.peer import WorkerPeer
from benchmarks.transformers_peer import hf_model
from loss import AnswerLogProbs
from model import GPT


class TrlPeer(WorkerPeer):
    name = "trl"
    module = "benchmarks.trl_peer"

    def dpo_timer(self, kind, x, y, beta, lora_r):
        self.ask(trl=kind, pairs=pair_ids(x, y), beta=beta, lora_r=lora_r)
        return self.timer(f"trl {kind}")

    def dpo_loss_check(self, x, y, beta):
        check = self.ask(trl_check=pair_ids(x, y), beta=beta)
        return {"trl": check["trl_loss"], "grafito": grafito_dpo_loss(check, x, y, beta)}


def pair_ids(x, y):
    """The batch's pairs as TRL takes them: prompt, chosen answer and rejected answer ids."""
    B = len(x) // 2

    def prompt_and_answer(row):
        first = int(np.argmax(y[row] >= 0))  # y[t] is the token at t + 1
        return x[row, :first + 1].tolist(), y[row][y[row] >= 0].tolist()

    pairs = []
    for i in range(B):
        (prompt, chosen), (_, rejected) = prompt_and_answer(i), prompt_and_answer(B + i)
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def grafito_dpo_loss(check, x, y, beta):
    """grafito's DPO loss on the batch with the weights trl_loss_check saved, float32."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        policy, reference = (AnswerLogProbs(GPT.from_pretrained(check[name]).eval())(xt, yt)
                             for name in ("policy", "reference"))
    loss_sum, _ = dpo.step_loss(policy, reference, beta, 0.0)
    return loss_sum.item() / (len(x) // 2)  # the mean over the pairs, as TRL reports it


def handle(message, state, jobs):
    """The child side (benchmarks/worker.py): a DPOTrainer step made ready to time, or the loss check."""
    if "trl_check" in message:
        return trl_loss_check(state, message["trl_check"], message["beta"])
    if "trl" in message:
        trainer, model, inputs = trl_trainer(state, message["pairs"], message["beta"], message["trl"],
                                             message["lora_r"])

        def trl_step():
            trainer.training_step(model, inputs)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        jobs[f"trl {message['trl']}"] = lambda: timed(trl_step, state["device"])
        return {"ok": True}
    raise ValueError(f"unknown request {message}")


def trl_trainer(state, pairs, beta, kind, lora_r, reference=None, policy=None, dtype=None):
    """(trainer, its prepared model, the batch of all pairs): TRL's DPOTrainer on transformers'
    GPT-2 as a TRL user sets it up (LoRA through peft on c_attn; full fine-tuning with
    precomputed reference log-probabilities, as train.py does), prepared as Trainer.train
    prepares it, without its loop. The pairs come tokenized, so no tokenizer is needed but
    for the pad id."""
    import tempfile

    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):  # the pairs are ids already
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    device, dtype = state["device"], dtype or state["dtype"]
    eot = "<|endoftext|>"
    pad = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({eot: tokenizer.EOT}, eot)), eos_token=eot)
    policy = policy if policy is not None else hf_model(state["gpt_config"])
    peft_config = None
    if kind == "LoRA":
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"],
                                 fan_in_fan_out=True, task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="grafito-trl-"), per_device_train_batch_size=len(pairs),
                     learning_rate=1e-5, beta=beta, bf16=dtype == "bfloat16", use_cpu=device == "cpu", report_to="none",
                     precompute_ref_log_probs=kind == "full" and reference is None, max_length=None, seed=0,
                     gradient_checkpointing=False)  # TRL's default is on; grafito recomputes nothing
    trainer = PreTokenized(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(pairs),
                           processing_class=pad, peft_config=peft_config)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step
    trainer.create_optimizer()
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    return trainer, model, inputs


def trl_loss_check(state, pairs, beta):
    """TRL's DPO loss on the pairs, float32, a policy and a reference that differ a little; both
    saved so that grafito can compute its loss with the same weights (grafito_dpo_loss)."""
    import tempfile

    reference = hf_model(state["gpt_config"])
    policy = hf_model(state["gpt_config"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    folder = tempfile.mkdtemp(prefix="grafito-trl-check-")
    policy.save_pretrained(f"{folder}/policy")
    reference.save_pretrained(f"{folder}/reference")
    trainer, model, inputs = trl_trainer(state, pairs, beta, "full", 0, reference=reference, policy=policy,
                                         dtype="float32")
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer._prepare_inputs(inputs))
    return {"trl_loss": loss.item(), "policy": f"{folder}/policy", "reference": f"{folder}/reference"}
