"""Prepare your own chat data, or preference pairs, into data/NAME: the format train.py,
eval.py and bench.py read.

    python prepare/chat.py --input chats.jsonl                      # the format told by the keys
    python prepare/chat.py --input exports/ --out_dir data/support  # a folder, a glob, several files
    python prepare/chat.py --input hub:HuggingFaceH4/ultrachat_200k --split train_sft
    python prepare/chat.py --pairs --input prefs.parquet            # preference pairs, for DPO

A row holds one conversation in one of these formats (--format; auto tells them apart by
the keys of the first rows, and says which it chose):

    messages            {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    sharegpt            {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
    alpaca              {"instruction": "...", "input": "..." (optional), "output": "..."}
    prompt_completion   {"prompt": "...", "completion": "..."} (or "response"; either may be messages)

With --pairs a row is a preference in TRL's format: {"prompt", "chosen", "rejected"}, each
a string or a message list, or "chosen" and "rejected" alone as whole conversations (their
shared prompt is every message before the last assistant turn). Columns named otherwise
are given with --messages_field, --instruction_field, --input_field, --answer_field,
--system_field (and --prompt_field, --chosen_field, --rejected_field).

Every row becomes messages, and messages become (instruction, answer) turns as serve.py's
do (tokenizer.turns_from_messages folds a first system message into the first
instruction). A row that does not fit is a counted skip with its line in report.json;
then come the cleaning, splits and report every prepare script shares (pipeline.py).
"""

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline import Conversations, Record, Report, build, check_args, parser  # first: it puts the root on sys.path

import data  # noqa: E402
import sources  # noqa: E402
import tokenizer  # noqa: E402
from common import GrafitoError, run_cli  # noqa: E402
from pairs import Pairs, pair_from_turns  # noqa: E402

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
DETECT_ROWS = 100  # rows whose keys tell the format
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
TOOL_ROLES = {"tool", "function", "function_call", "function_response", "ipython", "observation", "tool_call",
              "tool_response"}
CONVERSATION_COLUMNS = ("messages_field", "instruction_field", "input_field", "answer_field", "system_field")
PAIR_COLUMNS = ("prompt_field", "chosen_field", "rejected_field")


class Skip(Exception):
    """A row that does not fit its format: the report's reason, and a detail for --strict."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class Layout:
    """The rows' format, and the column that holds each part (None: the rows have none)."""
    format: str  # one of FORMATS, or "pairs"
    columns: dict  # messages | instruction, input, answer, system | prompt, chosen, rejected -> column name
    required: tuple  # the parts every row must have

    def column_names(self):
        return [name for name in self.columns.values() if name]

    def fits(self, keys):
        return all(self.columns[part] in keys for part in self.required)


# ----------------------------------------------------------------------------- which format

def layouts(args, keys):
    """Every layout the options allow, in the order auto tries them."""
    if args.pairs:
        prompt = args.prompt_field or ("prompt" if "prompt" in keys else None)
        return [Layout("pairs", {"prompt": prompt, "chosen": args.chosen_field or "chosen",
                                 "rejected": args.rejected_field or "rejected"},
                       ("chosen", "rejected") + (("prompt",) if args.prompt_field else ()))]
    answer = args.answer_field or next((k for k in ("completion", "response") if k in keys), "completion")
    system = ("system",) if args.system_field else ()
    return [
        Layout("messages", {"messages": args.messages_field or "messages"}, ("messages",)),
        Layout("sharegpt", {"messages": args.messages_field or "conversations"}, ("messages",)),
        Layout("alpaca", {"instruction": args.instruction_field or "instruction", "input": args.input_field or "input",
                          "answer": args.answer_field or "output", "system": args.system_field},
               ("instruction", "answer") + (("input",) if args.input_field else ()) + system),
        Layout("prompt_completion", {"instruction": args.instruction_field or "prompt", "answer": answer,
                                     "system": args.system_field}, ("instruction", "answer") + system),
    ]


def detect(rows, args, where):
    """The Layout of the rows (the first rows of the source), and a line saying how it was chosen."""
    objects = [row for row in rows if isinstance(row, dict)]
    if not rows:
        raise GrafitoError(f"{where}: no records (empty)")
    if not objects:
        raise GrafitoError(f"{where}: the first {len(rows)} records are not JSON objects (rows with named fields)")
    counts = Counter(key for row in objects for key in row)
    keys = [key for key, n in counts.items() if 2 * n > len(objects)]  # in most of the first rows
    seen = f"the keys of the first {len(objects)} rows: {', '.join(keys) or 'none'}"
    candidates = layouts(args, keys)
    if args.format != "auto":
        candidates = [layout for layout in candidates if layout.format == args.format]
    fitting = [layout for layout in candidates if layout.fits(keys)]
    if not fitting:
        pairs_hint = "; they look like preference pairs: add --pairs" if not args.pairs and {"chosen", "rejected"} <= set(keys) else ""
        raise GrafitoError(f"{where}: {cannot_tell(candidates, args)}; {seen}{pairs_hint}")
    layout = fitting[0]
    if layout.format == "pairs" and not layout.columns["prompt"]:
        chosen = next((row.get(layout.columns["chosen"]) for row in objects if layout.columns["chosen"] in row), None)
        if not isinstance(chosen, list):
            raise GrafitoError(f"{where}: the pairs have no prompt column, and '{layout.columns['chosen']}' is not a "
                               f"message list the prompt could be taken from; name the prompt's column with "
                               f"--prompt_field (hh-rlhf's '\\n\\nHuman: ...' transcripts: prepare/hh_rlhf.py --pairs); {seen}")
    how = "as --format says" if args.format != "auto" else f"detected from {seen}"
    columns = ", ".join(f"{part} <- {name!r}" for part, name in layout.columns.items() if name)
    return layout, f"format {layout.format} ({columns}), {how}"


def cannot_tell(candidates, args):
    if args.pairs:
        return ("--pairs reads TRL's preference format, which needs the columns chosen and rejected (and prompt, "
                "unless they are whole conversations); name other columns with --chosen_field, --rejected_field, "
                "--prompt_field")
    if args.format != "auto":
        layout = candidates[0]
        return (f"--format {args.format} needs the columns {', '.join(layout.columns[p] for p in layout.required)}; "
                f"name them with --messages_field, --instruction_field, --input_field, --answer_field, --system_field")
    return (f"cannot tell the format; choose --format from {', '.join(FORMATS)} and name its columns with "
            f"--messages_field, or --instruction_field, --input_field, --answer_field, --system_field")


# ----------------------------------------------------------------------------- rows -> messages -> turns

def parse(rows, layout, report):
    """A Record per row that makes a conversation; the others are counted skips."""
    for line, row in rows:
        try:
            turns, repair = turns_of(conversation_messages(row, layout))
        except Skip as skip:
            report.skip(skip.reason, line, skip.detail)
            continue
        if repair:
            report.repair(repair, line)
        yield Record(line, turns)


def parse_pairs(rows, layout, report):
    """A pairs.Pair per row whose chosen and rejected sides are one conversation up to their
    last answer; the others are counted skips."""
    for line, row in rows:
        try:
            chosen, rejected = pair_messages(row, layout)
        except Skip as skip:
            report.skip(skip.reason, line, skip.detail)
            continue
        pair = pair_from_turns(line, chosen, rejected, report)
        if pair:
            yield pair


def conversation_messages(row, layout):
    """[(role, text), ...] of a row in one of the conversation formats."""
    check_object(row)
    columns = layout.columns
    if layout.format in ("messages", "sharegpt"):
        value = column(row, columns["messages"])
        if isinstance(value, str):  # a CSV cell holds the list as JSON text
            value = json_list(value)
        return messages_of(value)
    if layout.format == "alpaca":
        instruction, extra = text_column(row, columns["instruction"]), optional_text(row, columns["input"])
        messages = [("user", f"{instruction}\n\n{extra}" if extra.strip() else instruction),
                    ("assistant", text_column(row, columns["answer"]))]
    else:
        messages = messages_of(column(row, columns["instruction"]), "user") + \
            messages_of(column(row, columns["answer"]), "assistant")
    system = optional_text(row, columns["system"])
    return ([("system", system)] if system.strip() else []) + messages


def pair_messages(row, layout):
    """The turns of a preference row's chosen and rejected conversations."""
    check_object(row)
    columns = layout.columns
    prompt = messages_of(column(row, columns["prompt"]), "user") if columns["prompt"] else []
    sides = []
    for side in ("chosen", "rejected"):
        try:
            turns, _ = turns_of(prompt + messages_of(column(row, columns[side]), "assistant"), answered_only=True)
        except Skip as skip:
            raise Skip(skip.reason, f"{side}: {skip.detail}") from None
        sides.append(turns)
    return sides


def turns_of(messages, answered_only=False):
    """((instruction, answer) turns, a repair or None) of [(role, text), ...]: an optional first
    system message, then user and assistant alternating, ending with an answer. A last user
    message without an answer is removed (a repair) unless answered_only."""
    system = messages[:1] if messages[:1] and messages[0][0] == "system" else []
    body, repair = messages[len(system):], None
    if not answered_only and len(body) > 1 and [role for role, _ in body[-2:]] == ["assistant", "user"]:
        body, repair = body[:-1], "unanswered_last_message_removed"
    roles = [role for role, _ in body]
    if "assistant" not in roles:
        raise Skip("no_answer", " ".join(role for role, _ in messages))
    if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
        raise Skip("roles_out_of_order", " ".join(role for role, _ in messages))
    empty = next((k for k, (_, text) in enumerate(body) if not text.strip()), None)
    if empty is not None:
        raise Skip("empty_message", f"{body[empty][0]} message {empty + 1}")
    history, instruction = tokenizer.turns_from_messages(
        [{"role": role, "content": text} for role, text in system + body[:-1]])
    return history + [(instruction, body[-1][1].strip())], repair


def messages_of(value, role=None):
    """[(role, text), ...] of a column holding a message list (OpenAI role/content or ShareGPT
    from/value), or, given a role, a string: one message of that role."""
    if isinstance(value, str) and role:
        return [(role, value)]
    if not isinstance(value, list) or not value:
        raise Skip("not_a_message_list", type(value).__name__)
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise Skip("not_a_message_list", f"an item is a {type(message).__name__}")
        name = message.get("role", message.get("from"))
        if message.get("tool_calls") or message.get("function_call") or str(name).lower() in TOOL_ROLES:
            raise Skip("tool_call", f"a {name} message")
        if not isinstance(name, str) or name.lower() not in ROLES:
            raise Skip("unknown_role", repr(name))
        messages.append((ROLES[name.lower()], text_of(message.get("content", message.get("value")))))
    return messages


def text_of(content):
    """A message's text: a string, or a list of text parts (OpenAI's content parts) joined by
    line breaks; None is empty. Anything else (an image, audio) is not text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "\n".join(part["text"] for part in content)
    kinds = sorted({str(p.get("type")) for p in content if isinstance(p, dict)}) if isinstance(content, list) else []
    raise Skip("non_text_content", ", ".join(kinds) or type(content).__name__)


def check_object(row):
    if not isinstance(row, dict):
        raise Skip("not_an_object", type(row).__name__)


def column(row, name):
    value = row.get(name)
    if value is None:
        raise Skip("missing_field", name)
    return value


def text_column(row, name):
    value = column(row, name)
    if not isinstance(value, str):
        raise Skip("non_text_content", f"{name} is a {type(value).__name__}")
    return value


def optional_text(row, name):
    if not name or row.get(name) is None:
        return ""
    return text_column(row, name)


def json_list(text):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise Skip("not_a_message_list", "text that is not a JSON list") from None


# ----------------------------------------------------------------------------- the command

def dataset_name(inputs, pairs):
    """out_dir's default name: the hub dataset's name, or the first file's (or folder's) stem."""
    first = inputs[0]
    if first.startswith("hub:"):
        stem = first.removeprefix("hub:").partition("@")[0].split("/")[-1]
    else:
        path = Path(first).expanduser()
        if re.search(r"[*?[]", first):
            path = path.parent
        stem = path.name
        while sources.format_of(stem) or stem.lower().endswith(".gz"):
            stem = stem.rsplit(".", 1)[0]
    name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "chat"
    return f"{name}_pairs" if pairs else name


def main():
    p = parser("Prepare your own chat data (or preference pairs, --pairs) into token bins.", None, 1024,
               sources_input=True)
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                   help="the rows' format (default: told by the keys of the first rows)")
    p.add_argument("--pairs", action="store_true",
                   help="preference pairs in TRL's format (prompt, chosen, rejected), for objective=dpo")
    p.add_argument("--messages_field", help="column of the message list (messages, sharegpt)")
    p.add_argument("--instruction_field", help="column of the user's text (alpaca: instruction, prompt_completion: prompt)")
    p.add_argument("--input_field", help="alpaca: column appended to the instruction after a blank line (default input)")
    p.add_argument("--answer_field", help="column of the answer (alpaca: output, prompt_completion: completion or response)")
    p.add_argument("--system_field", help="alpaca, prompt_completion: a column holding a system message")
    p.add_argument("--prompt_field", help="--pairs: column of the prompt (default prompt, if there is one)")
    p.add_argument("--chosen_field", help="--pairs: column of the chosen answer (default chosen)")
    p.add_argument("--rejected_field", help="--pairs: column of the rejected answer (default rejected)")
    args = p.parse_args()
    other_mode = [f"--{name}" for name in (CONVERSATION_COLUMNS if args.pairs else PAIR_COLUMNS) if getattr(args, name)]
    if args.pairs and args.format != "auto":
        other_mode.insert(0, "--format")
    if other_mode:
        raise GrafitoError(f"{', '.join(other_mode)} {'do' if len(other_mode) > 1 else 'does'} not apply "
                           f"{'to --pairs' if args.pairs else 'without --pairs'}")
    name = dataset_name(args.input, args.pairs)
    args.out_dir = args.out_dir or data.DATA_ROOT / name
    check_args(args)
    source = sources.resolve(args.input, args.split, args.subset)
    layout, how = detect(sources.peek(source, DETECT_ROWS), args, source.label)
    print(how)
    report = Report(source.label, strict=args.strict)
    rows = sources.read_rows(source, report, columns=layout.column_names())
    kind, items = (Pairs(), parse_pairs(rows, layout, report)) if args.pairs else (Conversations(), parse(rows, layout, report))
    build(args, kind, items, report, args.out_dir.name,
          source={**source.describe(), "format": layout.format, "columns": layout.columns})


if __name__ == "__main__":
    run_cli(main)
