"""What a peer is: another implementation that bench.py times beside grafito, row by row, the
two taking turns. A peer module (benchmarks/<name>_peer.py, listed in benchmarks.PEERS) holds a
subclass of Peer; every row kind asks it for a timer and gets None where the peer has no such
row, so a peer implements only the rows it compares.

A peer written in Python can run in a child process of its own (WorkerPeer, benchmarks/worker.py),
started as a user would run it (without grafito's CPU allocator settings) and timed call by call
over a pipe.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import common
from common import GrafitoError

ROOT = Path(__file__).resolve().parents[1]


class Peer:
    """The rows a peer can be timed on; the defaults say "not this one". A timer is a callable
    returning what grafito's side of the row measures (seconds; for generation, seconds to the
    first new token and seconds of the tokens after it)."""

    name = ""  # the impl column of its rows

    def __init__(self, gpt_config, device, dtype, compile_model):
        self.gpt_config, self.device, self.dtype, self.compile = gpt_config, device, dtype, compile_model

    def train_timer(self, name, x, y, dropout):
        """A training step on batch (x, y) of numpy tokens (y: the next token, -1 where unsupervised)."""
        return None

    def generate_timer(self, name, prompts, new_tokens):
        """Greedy generation of new_tokens after each prompt (lists of token ids), as one batch."""
        return None

    def generate_timers(self, name, prompts, new_tokens):
        """[(impl, timer)]: the generation timers, one per way the peer runs (a peer with several
        formats overrides this; by default its one generate_timer, under its name)."""
        timer = self.generate_timer(name, prompts, new_tokens)
        return [] if timer is None else [(self.name, timer)]

    def decode_weight_bytes(self, impl):
        """Bytes of the weight matrices one decode step of `impl` reads, or None if unknown."""
        return None

    def dpo_timer(self, kind, x, y, beta, lora_r):
        """A DPO step ('LoRA' or 'full') on pair batch (x, y): chosen rows, then rejected rows."""
        return None

    def dpo_loss_check(self, x, y, beta):
        """{name: its DPO loss, "grafito": grafito's} on the batch with the same weights, or None."""
        return None

    def server(self, folder, device, dtype, port, max_clients, max_tokens):
        """(command, model name) of an OpenAI-compatible server of the model saved in
        folder (transformers format and tokenizer files) answering /health on port, or None."""
        return None

    def reset_memory(self):
        pass

    def memory_mb(self, impl=None):
        """Peak memory since reset_memory() (of impl, for a peer with several), as measure.peak_memory_mb
        reports grafito's."""
        return None

    def close(self):
        pass


class WorkerPeer(Peer):
    """A Peer whose work runs in a child process (the module's handle() answers there),
    started at its first request, so that a peer with no row in this run costs nothing."""

    module = ""  # the peer module the child imports
    process = None

    def ask(self, **message):
        if self.process is None:
            self._start()
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline() or '{"error": "the worker process exited"}')
        if "error" in reply:
            raise GrafitoError(f"{self.name} worker: {reply['error']}")
        return reply

    def _start(self):
        env = dict(os.environ, GRAFITO_SYSTEM_MALLOC="1")
        if common.THP_SET_BY_GRAFITO:
            env.pop("THP_MEM_ALLOC_ENABLE", None)
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", self.module], env=env, text=True,
                                        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ask(setup={"gpt_config": dataclasses.asdict(self.gpt_config), "device": self.device,
                        "dtype": self.dtype, "compile": self.compile})

    def timer(self, job):
        return lambda: self.ask(run=job)["result"]

    def reset_memory(self):
        if self.process is not None:
            self.ask(reset_memory=True)

    def memory_mb(self, impl=None):
        return self.ask(memory=True)["mb"] if self.process is not None else None

    def close(self):
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
            self.process = None
