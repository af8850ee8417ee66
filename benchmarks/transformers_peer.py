"""Hugging Face transformers beside grafito: GPT2LMHeadModel of the same shape taking training
steps (AdamW with PyTorch's defaults, what a transformers user writes) and generating greedily,
in its own process; and `transformers serve --continuous-batching` for the serve rows."""

import dataclasses
import math
import sys

import torch

from benchmarks.measure import StepClock, StepTimer, timed
from benchmarks.peer import WorkerPeer
from common import DTYPES


class TransformersPeer(WorkerPeer):
    name = "transformers"
    module = "benchmarks.transformers_peer"

    def train_timer(self, name, x, y, dropout):
        self.ask(train=name, x=x.tolist(), y=y.tolist(), dropout=dropout)
        return self.timer(name)

    def generate_timer(self, name, prompts, new_tokens):
        self.ask(generate=name, prompt=prompts, new_tokens=new_tokens)
        return self.timer(name)

    def server(self, folder, device, dtype, port, max_clients, max_tokens):
        # its KV cache sized to twice what these requests need (prompts under 64 tokens): by default it
        # claims most of the machine's memory
        blocks = math.ceil(max_clients * (64 + max_tokens) / 32) * 2
        return [
            sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--continuous-batching",
            f"--device={device}", f"--dtype={dtype}", f"--port={port}", "--cb-block-size=32",
            f"--cb-num-blocks={blocks}", "--cb-max-batch-tokens=2048", "--log-level=warning"], str(folder)


def hf_model(gpt_config):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=gpt_config.n_layer, n_head=gpt_config.n_head, n_embd=gpt_config.n_embd,
                                      n_positions=gpt_config.block_size, vocab_size=gpt_config.vocab_size,
                                      resid_pdrop=gpt_config.dropout, embd_pdrop=gpt_config.dropout,
                                      attn_pdrop=gpt_config.dropout))


def hf_labels(x, y):
    """transformers shifts labels itself: the label at position t is the token at t (-100 to skip)."""
    return torch.cat([torch.full_like(y[:, :1], -100), torch.where(y[:, :-1] >= 0, x[:, 1:], -100)], dim=1)


def handle(message, state, jobs):
    """The child side (benchmarks/worker.py): a training step or a generation, made ready to time."""
    device, dtype = state["device"], state["dtype"]
    if "train" in message:
        dropout = message["dropout"]
        if state.get("trainer_dropout") != dropout:
            state.pop("trainer", None)
            model = hf_model(dataclasses.replace(state["gpt_config"], dropout=dropout)).to(device)
            state["trainer"] = StepTimer(model, torch.optim.AdamW(model.parameters(), lr=1e-5), device, dtype,
                                         state["compile"])
            state["trainer_dropout"] = dropout
        x = torch.tensor(message["x"], device=device)
        labels = hf_labels(x, torch.tensor(message["y"], device=device))
        trainer = state["trainer"]
        jobs[message["train"]] = lambda: timed(lambda: trainer.step(input_ids=x, labels=labels), device)
        return {"ok": True}
    if "generate" in message:
        if "decoder" not in state:
            state.pop("trainer", None), state.pop("trainer_dropout", None)
            state["decoder"] = hf_model(state["gpt_config"]).eval().to(device=device, dtype=DTYPES[dtype])
        decoder, prompt = state["decoder"], torch.tensor(message["prompt"], device=device)
        n = message["new_tokens"]

        def generate():
            clock = StepClock(device)
            with torch.no_grad():
                decoder.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                 streamer=clock)
            return clock.first_token_and_decode()

        jobs[message["generate"]] = generate
        return {"ok": True}
    raise ValueError(f"unknown request {message}")
