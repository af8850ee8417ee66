"""llama.cpp beside grafito (--compare=llamacpp): llama-cpp-python generating greedily at batch 1
from export.py's GGUF of the same random weights, as f16 and as q8_0, each in its own process
with as many threads as grafito's. An optional dependency (pip install llama-cpp-python): without
it the llama.cpp rows are left out with a one-line note."""

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

import export
from benchmarks.measure import StepClock
from benchmarks.peer import Peer, WorkerPeer
from model import GPT

OUTTYPES = ("f16", "q8_0")
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: blocks of 32 int8 weights and one f16 scale


def available():
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppPeer(Peer):
    name = "llama.cpp"

    def __init__(self, gpt_config, device, dtype, compile_model):
        super().__init__(gpt_config, device, dtype, compile_model)
        self.workers, self.noted = {}, False
        self.folder = tempfile.TemporaryDirectory(prefix="grafito-bench-gguf-")

    def generate_timers(self, name, prompts, new_tokens):
        if len(prompts) != 1 or not self.device.startswith("cpu"):
            return []  # llama.cpp's rows: batch 1 on a CPU
        if not available():
            if not self.noted:
                print("(no llama.cpp rows: llama_cpp is not importable; pip install llama-cpp-python)",
                      file=sys.stderr, flush=True)
                self.noted = True
            return []
        timers = []
        for outtype in OUTTYPES:
            worker = self.workers.get(outtype) or self._start_worker(outtype)
            worker.ask(generate=name, prompt=prompts[0], new_tokens=new_tokens)
            timers.append((self.impl(outtype), worker.timer(name)))
        return timers

    @staticmethod
    def impl(outtype):
        return f"llama.cpp {outtype}"

    def _start_worker(self, outtype):
        """Its GGUF written from the weights bench.py's decode rows use (GPT at seed 0), then its process."""
        torch.manual_seed(0)
        path = Path(self.folder.name) / f"bench-{outtype}.gguf"
        export.write_gguf(GPT(self.gpt_config), path, outtype, "bench", {})
        worker = LlamaCppWorker(self.gpt_config, self.device, self.dtype, self.compile)
        worker.ask(load=str(path), threads=torch.get_num_threads())
        self.workers[outtype] = worker
        return worker

    def decode_weight_bytes(self, impl):
        """The matrices a token multiplies by: every layer's four and the tied output layer."""
        c = self.gpt_config
        weights = c.n_layer * (3 + 1 + 2 * c.mlp_width / c.n_embd) * c.n_embd ** 2 + c.vocab_size * c.n_embd
        outtype = next(o for o in OUTTYPES if self.impl(o) == impl)
        return weights * BYTES_PER_WEIGHT[outtype]

    def reset_memory(self):
        for worker in self.workers.values():
            worker.reset_memory()

    def memory_mb(self, impl=None):
        worker = next((w for o, w in self.workers.items() if self.impl(o) == impl), None)
        return worker.memory_mb() if worker is not None else None

    def close(self):
        for worker in self.workers.values():
            worker.close()
        self.workers = {}
        self.folder.cleanup()


class LlamaCppWorker(WorkerPeer):
    """One GGUF file loaded by llama-cpp-python in a child process."""

    name = "llama.cpp"
    module = "benchmarks.llamacpp_peer"


def handle(message, state, jobs):
    """The child side (benchmarks/worker.py): the model loaded, a greedy generation made ready to time."""
    if "load" in message:
        from llama_cpp import Llama

        state["llm"] = Llama(model_path=message["load"], n_ctx=state["gpt_config"].block_size, n_batch=512,
                             n_threads=message["threads"], n_threads_batch=message["threads"], verbose=False)
        return {"ok": True}
    if "generate" in message:
        llm, prompt, n = state["llm"], message["prompt"], message["new_tokens"]

        def generate():
            llm.reset()  # otherwise generate() reuses the previous run's cache for the prompt's common prefix
            clock = StepClock("cpu")
            clock.put(prompt)
            for made, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True), 1):
                clock.put(None)
                if made == n:
                    break
            return clock.first_token_and_decode()

        jobs[message["generate"]] = generate
        return {"ok": True}
    raise ValueError(f"unknown request {message}")
