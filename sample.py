"""Talk to a model: one answer, several samples, an interactive chat, or plain continuation.

    python sample.py --out_dir=out/ruby_002 --start="what is 2+2"   # a trained model answers
    python sample.py --init_from=gpt2 --raw --start="Once upon a time"  # GPT-2 continues text
    python sample.py --out_dir=out/ruby_002 --chat                   # multi-turn chat (/clear, /quit)
    python sample.py --init_from=gpt2 --shots=3 --start="who wrote hamlet"   # few-shot prompting

The model comes from init_from: 'resume' (the run in out_dir: its best/ weights, a LoRA
adapter merged into its base), a GPT-2 name, a hub repo id, or a local model folder.
Prompts are wrapped in the chat template unless --raw. Decoding uses the KV cache;
temperature=0 is greedy. Answers stop at end-of-text or at a new '### Instruction:'.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import tokenizer
from common import DTYPES, GrafitoError, read_text, resolve_device, resolve_dtype, run_cli
from configurator import load_config
from model import left_pad

DEFAULTS = dict(
    init_from="resume",  # resume (the run in out_dir) | gpt2, gpt2-medium, ... | hub repo id | model folder
    out_dir="out/ruby_002",
    start="what is 2+2",  # the prompt, or FILE:path to read it from a file
    num_samples=1,
    max_new_tokens=200,
    temperature=0.7,  # 0 is greedy
    top_k=50,  # 0 disables
    top_p=1.0,
    repetition_penalty=1.0,
    seed=1337,
    device="auto",
    dtype="auto",  # weights are cast to this for decoding: bfloat16 halves the memory traffic
    compile=False,  # torch.compile the one-token decode step (a one-off compile, then faster tokens)
    raw=False,  # plain continuation of start, no chat template
    chat=False,  # interactive multi-turn chat on stdin
    shots="",  # few-shot examples before every prompt: a .jsonl file of {"instruction", "answer"}, or a number N
    shots_dataset="grafito25k",  # where --shots=N draws its examples from (train split)
    verbose=False,  # print tokens/s
)


def load_for_inference(config):
    """(model, device) ready for decoding in the configured dtype."""
    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["dtype"], device)
    source = config["out_dir"] if config["init_from"] == "resume" else config["init_from"]
    if config["init_from"] == "resume" and not Path(source).is_dir():
        raise GrafitoError(f"no training run in out_dir={source}: train one (python train.py config/ruby_002.py) "
                           f"or talk to another model, e.g. --init_from=gpt2 or --init_from=path/to/model")
    model = checkpoint.load_model(source).eval()
    model.to(device=device, dtype=DTYPES[dtype])
    if config["compile"]:
        model.compile_decode()
    return model, device


def read_start(start):
    if start.startswith("FILE:"):
        return read_text(start[5:], f"--start={start}")
    return start


def load_shots(shots, dataset, seed):
    """Example turns to prepend: from a JSON-lines file, or N conversations of a prepared train split."""
    if not shots:
        return []
    if shots.isdigit():
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
        except (json.JSONDecodeError, KeyError, TypeError):
            turn = None
        if turn is None or not all(isinstance(text, str) and text.strip() for text in turn):
            raise GrafitoError(f"{path}, line {line_no}: expected a JSON object with non-empty 'instruction' and "
                               f"'answer' strings")
        turns.append(turn)
    if not turns:
        raise GrafitoError(f"--shots={shots}: the file holds no examples")
    return turns


def fit_prompt(history, instruction, block_size, max_new_tokens, warn):
    """Prompt ids for history + instruction that leave room for the reply: the oldest turns go
    first, then (a single over-long instruction) the prompt's left end. Returns (ids, turns kept).
    The room kept is max_new_tokens but at most half the context: a longer answer slides the
    window on as it grows, rather than starving the prompt."""
    budget = block_size - min(max_new_tokens, block_size // 2)
    while True:
        ids = tokenizer.render_prompt(history, instruction)
        if len(ids) <= budget or not history:
            break
        history = history[1:]
        warn("context full: dropping the oldest turns of the conversation")
    if len(ids) > budget:
        warn(f"prompt of {len(ids)} tokens is longer than the {budget} that leave room for the answer; "
             f"keeping its last {budget} tokens")
        ids = ids[-budget:]
    return ids, history


class Warner:
    """Prints each distinct warning once."""

    def __init__(self):
        self.said = set()

    def __call__(self, message):
        if message not in self.said:
            self.said.add(message)
            print(f"({message})", file=sys.stderr)


def generate_answers(model, prompts, config, generator=None, on_text=None, raw=False):
    """Answer texts for chat prompts (token id lists, decoded as one left-padded batch), with
    config's sampling options; on_text(str) streams the first row. raw=True: plain continuations
    (only end-of-text stops them, spaces kept). Returns (texts, steps, seconds)."""
    device = next(model.parameters()).device
    idx, mask = left_pad(prompts, pad_id=tokenizer.EOT)
    mask = None if mask.all() else mask.to(device)  # equal lengths need no padding mask
    streams = [tokenizer.AnswerStream(raw=raw) for _ in prompts]
    started, steps = time.perf_counter(), 0
    for tokens in model.generate_stream(idx.to(device), config["max_new_tokens"], temperature=config["temperature"],
                                        top_k=config["top_k"] or None, top_p=config["top_p"],
                                        repetition_penalty=config["repetition_penalty"],
                                        stop_ids=[tokenizer.EOT], prompt_mask=mask, generator=generator,
                                        vocab_limit=tokenizer.VOCAB_SIZE):
        steps += 1
        for i, (stream, token) in enumerate(zip(streams, tokens.tolist())):
            text = stream.add(token)
            if i == 0 and on_text and text:
                on_text(text)
        if all(s.done for s in streams):
            break
    for i, stream in enumerate(streams):
        if not stream.done:
            text = stream.finish()
            if i == 0 and on_text and text:
                on_text(text)
    return [s.text for s in streams], steps, time.perf_counter() - started


def raw_prompt(text, block, warn):
    """--raw: the start text's ids, cut from the left to leave room for at least one token."""
    ids = tokenizer.encode(text) or [tokenizer.EOT]
    if len(ids) >= block:
        warn(f"prompt of {len(ids)} tokens exceeds the context; keeping its last {block - 1}")
        ids = ids[-(block - 1):]
    return ids


def chat(model, config, shots, generator, lines=None):
    """Interactive multi-turn chat; reads stdin lines (a terminal or a pipe)."""
    interactive = lines is None and sys.stdin.isatty()
    lines = iter(lines) if lines is not None else sys.stdin
    warn, history = Warner(), []
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
        ids, kept = fit_prompt(shots + history, message, model.config.block_size, config["max_new_tokens"], warn)
        dropped = len(shots) + len(history) - len(kept)
        history = kept[max(0, len(shots) - dropped):]  # the examples stay for the next turn; old turns go
        answers, _, _ = generate_answers(model, [ids], config, generator, on_text=lambda t: print(t, end="", flush=True))
        print()
        if answers[0]:  # an empty reply leaves no turn to remember
            history.append((message, answers[0]))
    return history


def main():
    config = load_config(DEFAULTS)
    for key in ("num_samples", "max_new_tokens"):
        if config[key] < 1:
            raise GrafitoError(f"{key} must be at least 1, got {config[key]}")
    if config["temperature"] < 0 or not 0 < config["top_p"] <= 1 or config["repetition_penalty"] <= 0:
        raise GrafitoError("need temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0")
    if config["raw"] and (config["chat"] or config["shots"]):
        raise GrafitoError("--raw continues plain text: it takes neither --chat nor --shots (few-shot examples "
                           "are chat turns; for a base model, write them into --start)")
    model, device = load_for_inference(config)
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    shots = load_shots(config["shots"], config["shots_dataset"], config["seed"])
    if config["chat"]:
        chat(model, config, shots, generator)
        return
    text = read_start(config["start"])
    if config["raw"]:  # shown after the prompt text it continues
        ids = raw_prompt(text, model.config.block_size, Warner())
        print(text, end="", flush=True)
    else:
        ids, _ = fit_prompt(shots, text, model.config.block_size, config["max_new_tokens"], Warner())
    # the first sample streams as it is generated; the others are printed when the batch is done
    stream = lambda t: print(t, end="", flush=True)
    answers, count, seconds = generate_answers(model, [ids] * config["num_samples"], config, generator,
                                               on_text=stream, raw=config["raw"])
    print()
    for answer in answers[1:]:
        print("---------------\n" + (text if config["raw"] else "") + answer)
    if config["verbose"]:
        print(f"({count} tokens x {config['num_samples']} in {seconds:.2f}s: "
              f"{count * config['num_samples'] / seconds:.1f} tokens/s, prompt {len(ids)} tokens)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
