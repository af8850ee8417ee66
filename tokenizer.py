"""GPT-2 BPE and the grafito chat template: the one place where conversations become
tokens and loss masks (prepare, train, sample and eval all import it).

A conversation is a list of (instruction, answer) turns, rendered as

    ### Instruction: {instruction}\n\n### Answer: {answer}\n\n### Instruction: ...<|endoftext|>

The loss mask is 1 on the answer tokens and on the final <|endoftext|> (so the model learns
to stop) and 0 on everything else.

Text inside a turn never forms a marker: `neutralize` lower-cases the marker words of a
'### Instruction:' or '### Answer:' written inside an instruction or answer, and breaks a
literal '<|endoftext|>', so a prompt cannot forge a turn (prepare, sample, serve and the
exported chat template all render through the same rule).

Token boundaries: each turn is encoded as two segments, the prompt "...### Answer:" and the
answer " {answer}" with its leading space (BPE merges that space into the answer's first
word). Both cuts fall where GPT-2's pre-tokenizer cuts the whole text anyway, so the ids
equal encoding the full text in one go; tests check this on the real datasets.

Run `python tokenizer.py` to see which tokens of a conversation are supervised.
"""

import functools
import os
import re
import sys

import tiktoken

import data
from common import GrafitoError, run_cli

EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257
INSTRUCTION = "### Instruction:"
ANSWER = "### Answer:"
TURN_SEPARATOR = "\n\n"
TEMPLATE = f"{INSTRUCTION} {{instruction}}{TURN_SEPARATOR}{ANSWER} {{answer}}"  # for meta.json
EOT_TEXT = "<|endoftext|>"
# what neutralize() writes instead of each marker found inside a turn's text
NEUTRALIZED = {INSTRUCTION: "### instruction:", ANSWER: "### answer:", EOT_TEXT: "<endoftext>"}


def _jinja_literal(text):
    """text as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The template above as Jinja, for exported models (transformers' apply_chat_template, llama.cpp,
# LM Studio): it renders exactly render_text() for a conversation ending with an answer and
# render_prompt() for one ending with a user message (with add_generation_prompt), folding a
# first system message into the first instruction as turns_from_messages() does.
_NEUTRALIZE = "".join(f" | replace({_jinja_literal(m)}, {_jinja_literal(h)})" for m, h in NEUTRALIZED.items())
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}\n"
    "{%- set turns = messages -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "  {%- set ns.system = messages[0]['content'] | trim -%}\n"
    "  {%- set turns = messages[1:] -%}\n"
    "{%- endif -%}\n"
    "{%- for message in turns -%}\n"
    "  {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}\n"
    "    {{- raise_exception('messages must alternate user, assistant, ... after an optional first system message') -}}\n"
    "  {%- endif -%}\n"
    "  {%- set text = message['content'] | trim -%}\n"
    "  {%- if not text -%}{{- raise_exception('a user or assistant message is empty') -}}{%- endif -%}\n"
    "  {%- if loop.first and ns.system -%}\n"
    f"    {{%- set text = ns.system ~ {_jinja_literal(TURN_SEPARATOR)} ~ text -%}}\n"
    "  {%- endif -%}\n"
    f"  {{%- set text = text{_NEUTRALIZE} -%}}\n"
    "  {%- if message['role'] == 'user' -%}\n"
    f"    {{%- if not loop.first -%}}{{{{- {_jinja_literal(TURN_SEPARATOR)} -}}}}{{%- endif -%}}\n"
    f"    {{{{- {_jinja_literal(INSTRUCTION + ' ')} ~ text -}}}}\n"
    "    {%- if not loop.last or add_generation_prompt -%}"
    f"{{{{- {_jinja_literal(TURN_SEPARATOR + ANSWER)} -}}}}{{%- endif -%}}\n"
    "  {%- else -%}\n"
    f"    {{{{- ' ' ~ text -}}}}\n"
    f"    {{%- if loop.last -%}}{{{{- {_jinja_literal(EOT_TEXT)} -}}}}{{%- endif -%}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
)


@functools.cache
def get_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache else "TIKTOKEN_CACHE_DIR is unset"
        raise GrafitoError(
            f"could not load the GPT-2 BPE files ({type(err).__name__}: {err}); offline, point "
            f"TIKTOKEN_CACHE_DIR at a tiktoken cache holding them, e.g. "
            f"export TIKTOKEN_CACHE_DIR=$(cd ../shared/tiktoken && pwd) ({where})") from None


def encode(text):
    """Plain text to ids; special-token strings in the text are encoded as ordinary text."""
    return get_encoding().encode_ordinary(text)


def decode(ids):
    return get_encoding().decode(list(ids))


def decode_bytes(ids):
    """Raw UTF-8 bytes, for streaming output that must not split a multi-byte character."""
    return get_encoding().decode_bytes(list(ids))


def squash(text):
    """Text reduced to lower-case letters and digits: the key for "same text up to case, spacing
    and punctuation" (duplicate conversations in prepare, answers that repeat the query in eval)."""
    return re.sub(r"[\W_]+", "", text.casefold())


def neutralize(text):
    """Turn text with every template marker inside it made harmless (one pass suffices: the
    replacements contain no marker and cannot complete one with their neighbours)."""
    for marker, harmless in NEUTRALIZED.items():
        text = text.replace(marker, harmless)
    return text


def _prompt_segment(instruction, first_turn):
    separator = "" if first_turn else TURN_SEPARATOR
    return f"{separator}{INSTRUCTION} {neutralize(instruction.strip())}{TURN_SEPARATOR}{ANSWER}"


def _segments(conversation):
    """(text, supervised) pieces of a conversation, without the final end-of-text."""
    if not conversation:
        raise ValueError("a conversation needs at least one (instruction, answer) turn")
    segments = []
    for i, (instruction, answer) in enumerate(conversation):
        if not answer.strip():
            raise ValueError(f"turn {i + 1} has an empty answer; drop it before rendering")
        segments.append((_prompt_segment(instruction, i == 0), 0))
        segments.append((" " + neutralize(answer.strip()), 1))
    return segments


def render(conversation):
    """Conversation -> (ids, mask): mask is 1 on answer tokens and the final end-of-text."""
    return render_batch([conversation])[0]


def render_batch(conversations, num_threads=8):
    """render() for many conversations, encoding all segments with tiktoken's threaded batch call."""
    all_segments = [_segments(c) for c in conversations]
    flat_texts = [text for segments in all_segments for text, _ in segments]
    flat_ids = get_encoding().encode_ordinary_batch(flat_texts, num_threads=num_threads)
    rendered, k = [], 0
    for segments in all_segments:
        ids, mask = [], []
        for _, supervised in segments:
            ids.extend(flat_ids[k])
            mask.extend([supervised] * len(flat_ids[k]))
            k += 1
        ids.append(EOT)
        mask.append(1)
        rendered.append((ids, mask))
    return rendered


def render_text(conversation):
    """The text render() encodes, with the end-of-text marker spelled out."""
    return "".join(text for text, _ in _segments(conversation)) + "<|endoftext|>"


def render_prompt(history, instruction):
    """Ids of earlier turns (with their answers) plus a new instruction, ending at '### Answer:'.

    The model's reply starts with a space-prefixed token, as the answers it was trained on.
    """
    ids = []
    for text, _ in _segments(history) if history else []:
        ids += encode(text)
    return ids + encode(_prompt_segment(instruction, not history))


def turns_from_messages(messages):
    """Chat messages [{"role", "content"}, ...] as OpenAI's API sends them -> (history, instruction):
    the answered (instruction, answer) turns and the last user message, which the reply answers.

    Roles alternate user, assistant, ..., user. A system message may come first only; it is
    folded into the first instruction as "{system}\n\n{instruction}" (the template has no
    system turn). Anything else raises ValueError saying what is wrong.
    """
    if not messages:
        raise ValueError("messages is empty: send at least one user message")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    roles = [m["role"] for m in messages]
    unknown = sorted({r for r in roles if r not in ("user", "assistant", "system")})
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r}: use system, user or assistant")
    if "system" in roles:
        raise ValueError("a system message may only come first")
    expected = ["user", "assistant"] * (len(roles) // 2) + ["user"]
    if roles != expected[:len(roles)] or len(roles) % 2 == 0:
        raise ValueError("messages must alternate user, assistant, ..., and end with a user message")
    texts = [m["content"].strip() for m in messages]
    if any(not t for t in texts):
        raise ValueError("a user or assistant message is empty")
    if system:
        texts[0] = f"{system}{TURN_SEPARATOR}{texts[0]}"
    return list(zip(texts[:-1:2], texts[1::2])), texts[-1]


def prompt_budget(block_size, max_new_tokens):
    """Prompt tokens allowed: the context less the room kept for the reply (max_new_tokens,
    at most half the context; a longer reply slides the window on as it grows)."""
    return block_size - min(max_new_tokens, block_size // 2)


def fit_prompt(history, instruction, budget):
    """Prompt ids for history + instruction in at most `budget` tokens: the oldest turns go
    first, then (a single over-long instruction) the prompt's left end.
    Returns (ids, the history kept, notes: what was dropped or cut, for the user)."""
    notes = []
    ids = render_prompt(history, instruction)
    while len(ids) > budget and history:
        history = history[1:]
        ids = render_prompt(history, instruction)
        if not notes:
            notes.append("context full: dropping the oldest turns of the conversation")
    if len(ids) > budget:
        notes.append(f"prompt of {len(ids)} tokens is longer than the {budget} that leave room for the answer; "
                     f"keeping its last {budget} tokens")
        ids = ids[-budget:]
    return ids, history, notes


def turns_from_rendered(ids, mask):
    """The inverse of render(): (ids, mask) of a conversation back to its (instruction, answer) turns."""
    turns, prompt, answer = [], [], []
    for token, supervised in zip(list(ids) + [None], list(mask) + [0]):
        if supervised:
            answer.append(token)
            continue
        if answer:
            instruction = decode(prompt).strip().removeprefix(INSTRUCTION).removesuffix(ANSWER).strip()
            turns.append((instruction, decode([t for t in answer if t != EOT]).strip()))
            prompt, answer = [], []
        if token is not None:
            prompt.append(token)
    return turns


class AnswerStream:
    """Generated tokens -> the text of one answer, as it grows.

    add() returns only text that is final: complete UTF-8 characters (a token may end inside
    one), never the start of a template marker ('### Instruction:' or '### Answer:' ends the
    answer; a partial '##' is held back until it is clear, and dropped if the tokens run out
    while it starts a line), and no leading or trailing whitespace. `done` turns True at end-of-text or a marker; `text` is the whole answer.
    raw=True is for plain continuation: complete characters only, no markers, spaces kept.
    """

    STOPS = (INSTRUCTION, ANSWER, EOT_TEXT)  # EOT_TEXT: the marker spelled out as ordinary tokens

    def __init__(self, raw=False):
        import codecs

        self.raw = raw
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw = ""  # everything decoded so far
        self._emitted = 0  # characters of the answer already returned
        self.done = False

    @property
    def text(self):
        return self._answer(final=True)

    def add(self, token):
        if self.done:
            return ""
        if token == EOT:
            self.done = True
            self._raw += self._utf8.decode(b"", final=True)
            return self._emit(final=True)
        self._raw += self._utf8.decode(get_encoding().decode_single_token_bytes(int(token)))
        if not self.raw and any(stop in self._raw for stop in self.STOPS):
            self.done = True
            return self._emit(final=True)
        return self._emit(final=False)

    def finish(self):
        """No more tokens (max_new_tokens reached): release what was held back."""
        self._raw += self._utf8.decode(b"", final=True)
        self.done = True
        return self._emit(final=True)

    def _answer(self, final):
        if self.raw:
            return self._raw
        cut = min([self._raw.index(s) for s in self.STOPS if s in self._raw], default=len(self._raw))
        text = self._raw[:cut].lstrip()
        held = max((k for s in self.STOPS for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if final:  # at the end, drop only a partial marker that starts a line, as real markers do
            starts_line = held and (held == len(text) or text[len(text) - held - 1] == "\n")
            held = held if starts_line else 0
        return text[:len(text) - held].rstrip()

    def _emit(self, final):
        answer = self._answer(final)
        new = answer[self._emitted:]
        self._emitted = max(self._emitted, len(answer))
        return new


def show_supervised(ids, mask, color=None):
    """The decoded text with supervised spans marked: green on a terminal, else [[...]]."""
    color = sys.stdout.isatty() if color is None else color
    start, end = ("\x1b[42m", "\x1b[0m") if color else ("[[", "]]")
    out, span, span_supervised = [], [], None
    for token, supervised in zip(ids, mask):
        if span and supervised != span_supervised:
            text = decode(span)
            out.append(f"{start}{text}{end}" if span_supervised else text)
            span = []
        span.append(token)
        span_supervised = supervised
    if span:
        text = decode(span)
        out.append(f"{start}{text}{end}" if span_supervised else text)
    return "".join(out)


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Show which tokens of a conversation are supervised.")
    parser.add_argument("turns", nargs="*", help="instruction answer [instruction answer ...]")
    parser.add_argument("--dataset", help="a prepared data folder: show its first conversations")
    parser.add_argument("--split", default="train")
    parser.add_argument("-n", type=int, default=3, help="conversations to show from --dataset")
    args = parser.parse_args()
    if args.dataset:
        split = data.load_split(args.dataset, args.split)
        for i in range(min(args.n, split.num_conversations)):
            ids, mask = split.conversation(i)
            print(show_supervised(ids, mask), end="\n\n")
        return
    turns = args.turns or ["What is 2+2?", "4", "And 3+3?", "6, because 3 + 3 = 6."]
    if len(turns) % 2:
        raise GrafitoError("give instruction/answer pairs: an even number of texts")
    ids, mask = render(list(zip(turns[::2], turns[1::2])))
    print(show_supervised(ids, mask))
    print(f"{len(ids)} tokens, {sum(mask)} supervised")


if __name__ == "__main__":
    run_cli(main)
