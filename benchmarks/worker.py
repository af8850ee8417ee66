"""The child process of a WorkerPeer: JSON requests on stdin, one JSON reply per line.

    python -m benchmarks.worker benchmarks.transformers_peer

The peer module's handle(message, state, jobs) prepares its jobs (callables returning what a
timer returns); this loop sets up, runs jobs and reports memory for every peer alike.
"""

import importlib
import json
import os
import sys

from benchmarks.measure import peak_memory_mb, reset_peak_memory
from model import GPTConfig


def worker(module):
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # whatever libraries print must not reach the pipe
    state, jobs = {}, {}
    for line in sys.stdin:
        message = json.loads(line)
        try:
            reply = _answer(module, message, state, jobs)
        except Exception as err:  # reported to the parent as one line
            reply = {"error": f"{type(err).__name__}: {err}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _answer(module, message, state, jobs):
    if "setup" in message:
        state.update(message["setup"])
        state["gpt_config"] = GPTConfig(**state["gpt_config"])
        return {"ok": True}
    if "run" in message:
        return {"result": jobs[message["run"]]()}
    if "reset_memory" in message:
        reset_peak_memory(state["device"])
        return {"ok": True}
    if "memory" in message:
        return {"mb": peak_memory_mb(state["device"])}
    return module.handle(message, state, jobs)


if __name__ == "__main__":
    worker(importlib.import_module(sys.argv[1]))
