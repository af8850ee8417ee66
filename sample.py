"""Talk to a model: one answer, several samples, an interactive chat, or plain continuation.

    python sample.py --out_dir=out/ruby_002 --start="what is 2+2"   # a trained model answers
    python sample.py --init_from=gpt2 --raw --start="Once upon a time"  # GPT-2 continues text
    python sample.py --out_dir=out/ruby_002 --chat                   # multi-turn chat (/clear, /quit)
    python sample.py --init_from=gpt2 --shots=3 --start="who wrote hamlet"   # few-shot prompting
    python sample.py --out_dir=out/ruby_002 --quantize=w8a8          # 8-bit weights and activations (CPUs: quantize.py)

The model comes from init_from: 'resume' (the run in out_dir: its best/ weights, a LoRA
adapter merged into its base), a GPT-2 name, a hub repo id, or a local model folder.
Prompts are wrapped in the chat template unless --raw. Decoding runs through engine.py;
temperature=0 is greedy. Answers stop at end-of-text or at a new '### Instruction:'.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
import engine
import quantize
import tokenizer
from common import GrafitoError, read_text, run_cli
from configurator import SEED, check_options, integer, load_config

DEFAULTS = dict(
    init_from="resume",  # resume (the run in out_dir) | gpt2, gpt2-medium, ... | hub repo id | model folder
    out_dir="out/ruby_002",
    start="what is 2+2",  # the prompt, or FILE:path to read it from a file
    num_samples=1,
    **engine.CHAT_DEFAULTS,  # max_new_tokens, temperature (0 is greedy), top_k (0 disables), top_p, repetition_penalty
    seed=1337,
    device="auto",
    dtype="auto",  # weights are cast to this for decoding: bfloat16 halves the memory traffic
    compile=False,  # torch.compile the one-token decode step (a one-off compile, then faster tokens)
    quantize="",  # int8 | w8a8: 8-bit weights on a CPU, about half the bytes a token reads (quantize.py)
    raw=False,  # plain continuation of start, no chat template
    chat=False,  # interactive multi-turn chat on stdin
    shots="",  # few-shot examples before every prompt: a .jsonl file of {"instruction", "answer"}, or a number N
    shots_dataset="grafito25k",  # where --shots=N draws its examples from (train split)
    verbose=False,  # print tokens/s
)
RULES = {"num_samples": integer(1, 1024), "max_new_tokens": integer(1, 1 << 20), "seed": SEED, **quantize.RULES}


def sampling_of(config):
    """engine.Sampling from the options (checked there: temperature, top_k, top_p, penalty)."""
    return engine.Sampling(temperature=config["temperature"], top_k=config["top_k"], top_p=config["top_p"],
                           repetition_penalty=config["repetition_penalty"])


def read_start(start):
    if start.startswith("FILE:"):
        return read_text(start[5:], f"--start={start}")
    return start


def load_shots(shots, dataset, seed):
    """Example turns to prepend: from a JSON-lines file, or N conversations of a prepared train split."""
    if not shots:
        return []
    if shots.isascii() and shots.isdigit():
        split = data.load_split(dataset, "train")
        if int(shots) > split.num_conversations:
            raise GrafitoError(f"--shots={shots}: the train split of {dataset} has only {split.num_conversations} "
                               f"conversations to draw examples from")
        picks = np.random.default_rng(seed).choice(split.num_conversations, size=int(shots), replace=False)
        return [turn for i in picks for turn in tokenizer.turns_from_rendered(*split.conversation(int(i)))]
    path = Path(shots).expanduser()
    if not path.is_file():
        raise GrafitoError(f"--shots={shots}: neither a number nor a file")
    turns = []
    for line_no, line in enumerate(read_text(path, f"--shots={shots}").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
            turn = (example["instruction"], example["answer"])
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            turn = None
        if turn is None or not all(isinstance(text, str) and text.strip() for text in turn):
            raise GrafitoError(f"{path}, line {line_no}: expected a JSON object with non-empty 'instruction' and "
                               f"'answer' strings")
        turns.append(turn)
    if not turns:
        raise GrafitoError(f"--shots={shots}: the file holds no examples")
    return turns


_warned = set()


def warn_once(message):
    if message not in _warned:
        _warned.add(message)
        print(f"({message})", file=sys.stderr)


def raw_prompt(text, block_size):
    """--raw: the start text's ids, cut from the left to leave room for at least one token."""
    ids = tokenizer.encode(text) or [tokenizer.EOT]
    if len(ids) >= block_size:
        warn_once(f"prompt of {len(ids)} tokens exceeds the context; keeping its last {block_size - 1}")
        ids = ids[-(block_size - 1):]
    return ids


def chat(model_engine, config, shots, generator, lines=None):
    """Interactive multi-turn chat; reads stdin lines (a terminal or a pipe)."""
    interactive = lines is None and sys.stdin.isatty()
    lines = iter(lines) if lines is not None else sys.stdin
    history = []
    budget = tokenizer.prompt_budget(model_engine.model.config.block_size, config["max_new_tokens"])
    if interactive:
        print("chat: type a message; /clear forgets the conversation, /quit (or Ctrl-D) leaves")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = next(lines, None)
        if line is None or line.strip() == "/quit":
            break
        message = line.strip()
        if message == "/clear":
            history = []
            print("(conversation cleared)")
            continue
        if not message:
            continue
        ids, kept, notes = tokenizer.fit_prompt(shots + history, message, budget)
        for note in notes:
            warn_once(note)
        dropped = len(shots) + len(history) - len(kept)
        history = kept[max(0, len(shots) - dropped):]  # the examples stay for the next turn; old turns go
        answers, _, _ = engine.answers(model_engine, [ids], config["max_new_tokens"], sampling_of(config), generator,
                                       on_text=lambda t: print(t, end="", flush=True))
        print()
        if answers[0]:  # an empty reply leaves no turn to remember
            history.append((message, answers[0]))
    return history


def main():
    config = load_config(DEFAULTS)
    check_options(config, RULES)
    sampling = sampling_of(config)
    if config["raw"] and (config["chat"] or config["shots"]):
        raise GrafitoError("--raw continues plain text: it takes neither --chat nor --shots (few-shot examples "
                           "are chat turns; for a base model, write them into --start)")
    shots = load_shots(config["shots"], config["shots_dataset"], config["seed"])
    model_engine = engine.load_engine(config)
    generator = torch.Generator(device=model_engine.device).manual_seed(config["seed"])
    if config["chat"]:
        chat(model_engine, config, shots, generator)
        return
    text = read_start(config["start"])
    block_size = model_engine.model.config.block_size
    if config["raw"]:  # shown after the prompt text it continues
        ids = raw_prompt(text, block_size)
        print(text, end="", flush=True)
    else:
        ids, _, notes = tokenizer.fit_prompt(shots, text, tokenizer.prompt_budget(block_size, config["max_new_tokens"]))
        for note in notes:
            warn_once(note)
    # the first sample streams as it is generated; the others are printed when the batch is done
    answers, steps, seconds = engine.answers(model_engine, [ids] * config["num_samples"], config["max_new_tokens"],
                                             sampling, generator, on_text=lambda t: print(t, end="", flush=True),
                                             raw=config["raw"])
    print()
    for answer in answers[1:]:
        print("---------------\n" + (text if config["raw"] else "") + answer)
    if config["verbose"]:
        print(f"({steps} tokens x {config['num_samples']} in {seconds:.2f}s: "
              f"{steps * config['num_samples'] / seconds:.1f} tokens/s, prompt {len(ids)} tokens)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
