"""What the prepare scripts share: the command line, the report, cleaning, and build(),
which turns parsed records into a written dataset.

A script reads its source (sources.py) and parses it into items, Records (a conversation:
(instruction, answer) turns) or pairs.Pair, counting what it skips; it hands them, as a
list or a stream, to build() with the kind of dataset to make:

    items -> chunks -> kind.process(chunk)   clean, drop by rule, render, fit block_size, pick the
                                             split: each item on its own, in worker processes
          -> outcomes, in source order
          -> admit()                         count repairs and drops in the report, drop duplicates
          -> writer.add()                    append the rows to the split files (data.py)
          -> Tally                           counts and lengths for the summary

A kind (Conversations below, pairs.Pairs) says how a chunk of items becomes Outcomes; the
report, duplicates, the empty-result check, the summary and its printout are written once,
here. Memory stays bounded whatever the source's size: items stream through a few chunks
at a time, and what is kept of each is a few numbers (digests, lengths).
"""

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import time
import unicodedata
from array import array
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import sources  # noqa: E402
import tokenizer  # noqa: E402
from common import GrafitoError  # noqa: E402
from configurator import SEED, check_options, integer, number  # noqa: E402

FIRST_LINES = 5  # line numbers kept per skip/drop reason in the report
CHUNK = 1024  # items a worker process handles at a time
INLINE_CHUNKS = 32  # chunks handled before worker processes start


@dataclass
class Record:
    line: object  # where the record starts in the source: its line (1-based), or "file:line"
    turns: list  # [(instruction, answer), ...]


@dataclass
class Report:
    """Counts of everything read, skipped (malformed), repaired and dropped (cleaning)."""
    source: str
    strict: bool = False
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    lines: dict = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason, line, detail=""):
        """A malformed record: counted, or with --strict the end of the run."""
        if self.strict:
            where = f"line {line}" if isinstance(line, int) else line
            raise GrafitoError(f"{self.source}, {where}: {reason.replace('_', ' ')}"
                               f"{': ' + detail if detail else ''} (without --strict such records are skipped and counted)")
        self._count(self.skipped, reason, line)

    def repair(self, reason, line):
        self._count(self.repaired, reason, line)

    def drop(self, reason, line):
        self._count(self.dropped, reason, line)

    def _count(self, counter, reason, line):
        counter[reason] += 1
        if len(self.lines[reason]) < FIRST_LINES:
            self.lines[reason].append(line)


# ----------------------------------------------------------------------------- command line

def parser(description, name, block_size, sources_input=False, item="conversation"):
    """The options every prepare script takes. name is out_dir's default under data/ (None:
    the script derives it from the source). sources_input=True: --input takes a SOURCE as
    sources.py reads it (files, a folder, a glob, hub:ORG/NAME) with --split and --subset;
    else one local file in the script's own format. block_size=None: items are documents
    (prepare/text.py), with no --block_size or --overlong."""
    p = argparse.ArgumentParser(description=description)
    if sources_input:
        formats = ".jsonl, .jsonl.gz, .json, .parquet, .csv" + (", .txt: one document a file" if item == "document" else "")
        p.add_argument("--input", nargs="+", required=True, metavar="SOURCE",
                       help=f"files, a folder or a glob ({formats}), or hub:ORG/NAME[@REVISION]")
        p.add_argument("--split", help="the split of a hub dataset to read (default train)")
        p.add_argument("--subset", help="the subset (configuration) of a hub dataset, if it has several")
    else:
        p.add_argument("--input", type=user_path, help="a local file in the source's format, instead of downloading")
    p.add_argument("--out_dir", type=user_path, default=data.DATA_ROOT / name if name else None,
                   help=f"default: data/{name or '<name of the source>'}")
    if block_size is not None:
        p.add_argument("--block_size", type=int, default=block_size,
                       help="longest conversation in tokens, end-of-text included (default %(default)s)")
        p.add_argument("--overlong", choices=["drop", "truncate"], default="truncate",
                       help="over-long conversations: drop them, or keep the turns that fit (default %(default)s)")
    p.add_argument("--val_fraction", type=float, default=0.05, help=f"share of {item}s in val (default %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="salts the hash that assigns the val split")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record instead of skipping it (repairs, e.g. of mojibake, are still made and counted)")
    p.add_argument("--workers", type=int, default=available_cores(),
                   help="processes that clean and tokenise (default: the cores available, %(default)s)")
    return p


def user_path(text):
    return Path(text).expanduser()


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_args(args):
    sizes = {"block_size": integer(8, 1 << 20)} if hasattr(args, "block_size") else {}  # documents have no block_size
    check_options(vars(args), {**sizes, "val_fraction": number(0.0, 1.0, high_open=True), "seed": SEED,
                               "workers": integer(1, 1024)})
    if isinstance(args.input, Path) and not args.input.is_file():
        raise GrafitoError(f"--input {args.input}: no such file")
    # before a download and minutes of cleaning, not after
    data.check_replaceable(args.out_dir)
    check_writable_parent(args.out_dir)


def check_writable_parent(folder):
    """The dataset is written beside folder and renamed into place: its parent must take new files."""
    parent = Path(folder).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise GrafitoError(f"--out_dir {folder}: cannot write in {parent} ({err.strerror or err}); choose another "
                           f"--out_dir") from None


def read_records(path, report, required_keys):
    """(line, object) for every JSON line of a .jsonl(.gz) file that holds the required string
    fields, streamed. Bad JSON, non-UTF-8 and records missing a required key are counted
    skips; a file that is empty, truncated, or where no record has the required keys is an
    error (raised once it is read)."""
    found = 0
    for line, value in sources.read_json_lines(Path(path), report):
        if not isinstance(value, dict) or any(not isinstance(value.get(k), str) for k in required_keys):
            report.skip("missing_key", line, f"needs string fields {', '.join(required_keys)}")
            continue
        found += 1
        yield line, value
    if report.read == 0:
        raise GrafitoError(f"{path}: no records (empty file)")
    if not found:
        raise GrafitoError(f"{path}: none of {report.read} records has the fields {', '.join(required_keys)}; "
                           f"is this the right file?")


# ----------------------------------------------------------------------------- cleaning

ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MOJIBAKE = re.compile(r"[ÃÂâðÅ][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]")


def repair_mojibake(text):
    """Undo UTF-8 text that was decoded as Windows-1252 (possibly twice): 'Ã±' -> 'ñ'."""
    for _ in range(2):
        if not MOJIBAKE.search(text):
            break
        try:
            text = text.encode("cp1252").decode("utf-8")
        except UnicodeError:
            break
    return text


def normalize_whitespace(text):
    text = CONTROL.sub("", ODD_SPACES.sub(" ", text.translate(ZERO_WIDTH).replace("\r\n", "\n").replace("\r", "\n")))
    lines = [re.sub(r"(?<=\S) {2,}", " ", line.rstrip()) for line in text.split("\n")]  # keeps indentation
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


PTB_ARTEFACTS = re.compile(r" [,.;:?!%)] |`` | ''|\( | n't\b| 's\b")


def detokenize_ptb(text):
    """Natural Questions answers carry Penn Treebank spacing: `` x '' , ( 1968 ) -> "x", (1968)."""
    if not PTB_ARTEFACTS.search(text + " "):
        return text
    text = re.sub(r"``\s*(.+?)\s*''", r'"\1"', text)
    text = re.sub(r" ([,.;:?!%)])(?= |$)", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return re.sub(r"\( ", "(", text)


CLEANING_STEPS = [  # (repair counted in the report, function); applied in this order to every text
    ("mojibake_repaired", repair_mojibake),
    ("unicode_or_whitespace_normalized", lambda t: normalize_whitespace(unicodedata.normalize("NFC", t))),
    ("ptb_spacing_detokenized", detokenize_ptb),
]


def clean_turns(turns, detokenize=False):
    """Cleaned turns and the names of the steps that changed something."""
    changed = set()
    for name, step in CLEANING_STEPS:
        if name == "ptb_spacing_detokenized" and not detokenize:
            continue
        new = [(step(q), step(a)) for q, a in turns]
        if [(q.strip(), a.strip()) for q, a in new] != [(q.strip(), a.strip()) for q, a in turns]:
            changed.add(name)
        turns = new
    return turns, changed


def dedup_key(turns):
    """Case-, space- and punctuation-insensitive text of a conversation."""
    return "\x1f".join(f"{tokenizer.squash(q)}\x1e{tokenizer.squash(a)}" for q, a in turns)


def digest(text):
    """A 64-bit digest of text: what duplicate checks keep of each item instead of its text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


NOUN = r"(?:passages?|paragraphs?|(?:reference |refrence |referenced )?text|article|document|excerpt|bio|biography|(?:blob|block|piece) of text)"
DET = r"(?:(?:the|a|an|this|these|that|following|above|below|provided|given|reference|referenced|refrence|background|short|attached|included|wikipedia|some)\s+)*"
REFERS_TO_TEXT = re.compile(
    rf"(?i)\b(?:given|give|from|using|based on|according to|as per|per|use|extract\w*|summari[sz]e|here is)\s+{DET}{NOUN}\b"
    rf"|\b(?:this|these|the following|the above|the below|the provided|the given|the reference|the referenced)\s+{DET}{NOUN}\b"
    rf"|\b(?:in|from)\s+the\s+(?:passage|paragraph|text)\b"
    rf"|\b{NOUN}\s+(?:below|above|provided)\b")
TEXT_FOLLOWS = re.compile(r":\s*\S.{60,}|\n\s*\S.{15,}", re.S)


def missing_context(instruction):
    """The instruction asks about a passage/paragraph/text that is not there (context stripped)."""
    m = REFERS_TO_TEXT.search(instruction)
    return bool(m) and not TEXT_FOLLOWS.search(instruction[m.end():])


ROLE_MARKER = re.compile(r"### (?:Instruction|Answer):|(?:^|\s)(?:Human|Assistant):")
FRAGMENT = re.compile(r"[\s()\[\]{}\"'`.,;:-]*")


def _drop_reason(turns, check_context):
    for q, a in turns:
        if not q:
            return "empty_instruction"
        if not a:
            return "empty_answer"
        if FRAGMENT.fullmatch(a):
            return "answer_without_words"  # only brackets/punctuation, e.g. ")" cut off from its text
        if ROLE_MARKER.search(a) or ROLE_MARKER.search(q):
            return "role_marker_inside_text"  # a turn boundary leaked into the text
        if dedup_key([(q, "")]) == dedup_key([(a, "")]):
            return "answer_repeats_instruction"
    if check_context and missing_context(turns[0][0]):
        return "instruction_refers_to_missing_text"
    return None


def in_val(turns, fraction, seed):
    """Deterministic split by a hash of the conversation: reruns and new data never move a sample."""
    return hashed_in_val(dedup_key(turns), fraction, seed)


def hashed_in_val(key, fraction, seed):
    """Whether the item whose text is key goes to val: a hash of seed and key, read as a number
    in [0, 1), below fraction. prepare/text.py's key is a document's text."""
    digest = hashlib.sha256(f"{seed}\x1d{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


# ----------------------------------------------------------------------------- one item's outcome

@dataclass
class Outcome:
    """What became of one item, worked out apart from the others (in a worker process);
    admit() counts it in the report in the order of the steps, and build() writes its rows."""
    line: object
    repairs: list  # cleaning repairs, counted whatever happens next
    drop: str = None  # the cleaning rule it breaks
    keys: tuple = None  # (exact, normalised) digests, for the duplicate check
    fit_repair: str = None  # how it was cut to fit block_size
    fit_drop: str = None  # why it could not fit
    val: bool = False
    rows: list = ()  # [(ids, mask), ...]: what the dataset gets
    turns: int = 0
    lengths: dict = field(default_factory=dict)  # {series: [token counts]}, for the summary


class Seen:
    """Digests of the items kept so far, as written and up to case, spacing and punctuation."""

    def __init__(self):
        self.exact, self.normalized = set(), set()

    def duplicate(self, keys):
        """The drop reason if these keys were seen, else None (and they are remembered)."""
        exact, normalized = keys
        if exact in self.exact:
            return "duplicate_exact"
        if normalized in self.normalized:
            return "duplicate_normalized"
        self.exact.add(exact)
        self.normalized.add(normalized)
        return None


def admit(outcome, report, seen):
    """Count an outcome as its steps ran: repairs, then a drop (a cleaning rule, a duplicate of
    an item kept before, or no fit in block_size), then the repair that made it fit. True if
    its rows are to be written."""
    for name in outcome.repairs:
        report.repair(name, outcome.line)
    reason = outcome.drop or seen.duplicate(outcome.keys) or outcome.fit_drop
    if reason:
        report.drop(reason, outcome.line)
        return False
    if outcome.fit_repair:
        report.repair(outcome.fit_repair, outcome.line)
    return True


# ----------------------------------------------------------------------------- conversations (SFT)

@dataclass
class Settings:
    """The options a kind's process() reads."""
    block_size: int
    overlong: str
    val_fraction: float
    seed: int


class Kind:
    """What build() needs of a kind of dataset. A kind's process() must be a pure function of
    its items (it runs in worker processes); Conversations and pairs.Pairs are the two."""
    name = "sft"  # data.dataset_writer's kind
    item = "conversation"  # one prepared item, in messages and the summary's keys
    series = ("length",)  # token counts summarised as "<series>_percentiles"

    def process(self, items, settings):
        """[Outcome] for a chunk of items, one each, in order."""
        raise NotImplementedError

    def writer(self, folder, meta):
        return data.dataset_writer(folder, meta, kind=self.name)


@dataclass
class Conversations(Kind):
    """SFT conversations: the whole conversation in a row, every answer supervised."""
    detokenize: bool = False  # undo Penn Treebank spacing (grafito-25k)
    check_context: bool = False  # drop instructions about a passage the record does not hold

    def process(self, records, settings):
        cleaned = [clean_conversation(r.turns, self.detokenize, self.check_context) for r in records]
        fitted = iter(fit_conversations([turns for turns, _, drop in cleaned if not drop], settings.block_size,
                                        settings.overlong))
        outcomes = []
        for record, (turns, repairs, drop) in zip(records, cleaned):
            outcome = Outcome(record.line, repairs, drop)
            if not drop:
                outcome.keys = conversation_keys(turns)
                kept, ids, mask, outcome.fit_repair, outcome.fit_drop = next(fitted)
                if not outcome.fit_drop:
                    outcome.val = in_val(kept, settings.val_fraction, settings.seed)
                    outcome.rows, outcome.turns, outcome.lengths = [(ids, mask)], len(kept), {"length": [len(ids)]}
            outcomes.append(outcome)
        return outcomes


def clean_conversation(turns, detokenize=False, check_context=False):
    """(cleaned turns, the repairs made, the rule it breaks or None)."""
    turns, changed = clean_turns(turns, detokenize)
    repairs = sorted(changed)
    if len(turns) > 1 and not turns[-1][1]:
        turns = turns[:-1]
        repairs.append("empty_last_answer_removed")
    return turns, repairs, _drop_reason(turns, check_context)


def conversation_keys(turns):
    return digest(json.dumps(turns)), digest(dedup_key(turns))


def fit_conversations(conversations, block_size, overlong):
    """(turns, ids, mask, repair, drop) per conversation: over-long ones lose their last turns
    until they fit (overlong='truncate'), else are dropped."""
    out = []
    for turns, (ids, mask) in zip(conversations, tokenizer.render_batch(conversations)):
        repair = drop = None
        if len(ids) > block_size:
            while overlong == "truncate" and len(turns) > 1 and len(ids) > block_size:
                turns = turns[:-1]
                ids, mask = tokenizer.render(turns)
            if len(ids) > block_size:
                drop = "longer_than_block_size"
            else:
                repair = "truncated_at_turn_to_fit_block_size"
        out.append((turns, ids, mask, repair, drop))
    return out


def clean_records(records, report, detokenize=False, check_context=False):
    """The cleaning step alone, for a list: normalise every record, then drop what should not
    be trained on; duplicates last."""
    kept, seen = [], Seen()
    for record in records:
        turns, repairs, drop = clean_conversation(record.turns, detokenize, check_context)
        if admit(Outcome(record.line, repairs, drop, None if drop else conversation_keys(turns)), report, seen):
            kept.append(Record(record.line, turns))
    return kept


def tokenize(records, block_size, overlong, report):
    """The fitting step alone, for a list: (record, ids, mask) per record that fits block_size."""
    out = []
    for record, (turns, ids, mask, repair, drop) in zip(records, fit_conversations([r.turns for r in records],
                                                                                    block_size, overlong)):
        if drop:
            report.drop(drop, record.line)
            continue
        if repair:
            report.repair(repair, record.line)
        out.append((Record(record.line, turns), ids, mask))
    return out


# ----------------------------------------------------------------------------- build: the whole run

def build(args, kind, items, report, name, source, extra_meta=None):
    """Clean, tokenise, split and write items (a list or a stream, in source order) as a
    dataset of this kind; print the report and save it beside the data. Nothing is written
    unless the train split gets an item."""
    started = time.perf_counter()
    settings = Settings(args.block_size, args.overlong, args.val_fraction, args.seed)
    seen, tally = Seen(), Tally(kind.series)
    total = len(items) if hasattr(items, "__len__") else None  # a stream has the reading bar of sources.py
    with kind.writer(args.out_dir, dataset_meta(name, source, args, extra_meta)) as writer, \
            tqdm(total=total, disable=total is None, desc="preparing", unit=kind.item, mininterval=0.5) as bar:
        for outcome in outcomes(kind, settings, items, args.workers):
            bar.update()
            if admit(outcome, report, seen):
                split = "val" if outcome.val else "train"
                for ids, mask in outcome.rows:
                    writer.add(split, ids, mask)
                tally.add(split, outcome)
        check_train_split(tally.items["train"], report, args, kind.item)
    summary = make_summary(report, kind, tally, writer.meta, time.perf_counter() - started)
    (Path(args.out_dir) / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, kind, args.out_dir)
    return summary


def outcomes(kind, settings, items, workers):
    """kind.process over chunks of items: every item's Outcome, in item order."""
    for chunk_outcomes in ordered_map(kind.process, chunked(items, CHUNK), workers, settings):
        yield from chunk_outcomes


def chunked(items, size):
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def ordered_map(function, chunks, workers, *args):
    """function(chunk, *args) for every chunk, results in chunk order: the first INLINE_CHUNKS
    in this process (starting processes costs seconds, more than small work takes), the rest,
    given several workers, in worker processes a few chunks ahead of the caller (never the
    whole input: memory stays bounded)."""
    chunks = iter(chunks)
    for chunk in chunks if workers == 1 else itertools.islice(chunks, INLINE_CHUNKS):
        yield function(chunk, *args)
    rest = list(itertools.islice(chunks, 1))
    if not rest:
        return
    # forkserver: a fork of this process could inherit a lock held by one of its threads
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=end_with, initargs=(os.getpid(),))
    try:
        pending = deque()
        for chunk in itertools.chain(rest, chunks):
            pending.append(pool.submit(function, chunk, *args))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def end_with(pid):
    """A worker's start: it ends when process pid (the pool's owner) is gone. An owner killed
    outright (SIGKILL) cannot stop its workers, and they would wait for work forever."""
    def watch():
        while process_running(pid):
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def process_running(pid):
    """False once the process has ended, even while it waits for its parent to collect it (a zombie)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: another user's process took the pid
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): a shell collects its children at once
        return True


class Tally:
    """What was written, for the summary: items per split, turns, and each series of lengths."""

    def __init__(self, series):
        self.items, self.turns = Counter(), 0
        self.series = {name: array("q") for name in series}

    def add(self, split, outcome):
        self.items[split] += 1
        self.turns += outcome.turns
        for name, values in outcome.lengths.items():
            self.series[name].extend(values)


def dataset_meta(name, source, args, extra_meta):
    """meta.json's description of a prepared dataset (SFT or pairs): where it came from and how it was made."""
    return {
        "dataset": name, "tokenizer": "gpt2 (tiktoken)", "vocab_size": tokenizer.VOCAB_SIZE,
        "eot_token": tokenizer.EOT, "template": tokenizer.TEMPLATE, "source": source,
        "block_size": args.block_size, "overlong": args.overlong, "val_fraction": args.val_fraction,
        "seed": args.seed, **(extra_meta or {}),
    }


def check_train_split(train_items, report, args, item):
    """Never replace a dataset with nothing: stop, saying where the records went."""
    if train_items:
        return
    lost = {**report.skipped, **report.dropped}
    reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(lost.items(), key=lambda kv: -kv[1]))
    raise GrafitoError(f"{report.source}: no {item} is left for the train split ({report.read:,} records read; "
                       f"{reasons or ('all went to val' if report.read else 'the input holds none')}); nothing "
                       f"written, {args.out_dir} is unchanged")


def make_summary(report, kind, tally, meta, seconds):
    items = f"{kind.item}s"
    splits = meta["splits"]
    tokens = sum(counts["tokens"] for counts in splits.values())
    supervised = sum(counts["supervised_tokens"] for counts in splits.values())
    return {
        "source": report.source,
        "records_read": report.read,
        "skipped_malformed": dict(report.skipped),
        "repaired": dict(report.repaired),
        "dropped": dict(report.dropped),
        "first_lines": {k: v for k, v in report.lines.items()},
        items: sum(tally.items.values()),
        "turns": tally.turns,
        "tokens": tokens,
        "supervised_fraction": round(supervised / max(tokens, 1), 4),
        **{f"{name}_percentiles": percentiles(values) for name, values in tally.series.items()},
        "splits": {split: {items: tally.items[split], **counts} for split, counts in splits.items()},
        "seconds": round(seconds, 2),
    }


def percentiles(values):
    values = np.array(values) if len(values) else np.zeros(1)
    return {f"p{q}": int(np.percentile(values, q)) for q in (50, 90, 99)} | {"max": int(values.max())}


def print_reasons(s):
    """The report's counts: records read, then every skip, repair and drop with its first lines."""
    print(f"read {s['records_read']:,} records from {s['source']}")
    for title, key in (("skipped (malformed)", "skipped_malformed"), ("repaired", "repaired"), ("dropped", "dropped")):
        for reason, n in sorted(s[key].items(), key=lambda kv: -kv[1]):
            lines = ", ".join(map(str, s["first_lines"].get(reason, [])))
            print(f"  {title:20s} {reason:44s} {n:7,}   first lines: {lines}")



def print_summary(s, kind, out_dir):
    print_reasons(s)
    items, sp = f"{kind.item}s", s["splits"]
    rows = sum(counts["conversations"] for counts in sp.values())
    print(f"kept {s[items]:,} {items} ({s['turns']:,} turns), {s['tokens']:,} tokens"
          f"{f' in their {rows:,} rows' if rows != s[items] else ''}, {s['supervised_fraction']:.1%} supervised")
    for name in kind.series:
        print(f"  {name.replace('_', ' ')} p50/p90/p99/max {'/'.join(str(v) for v in s[f'{name}_percentiles'].values())}")
    print(f"train {sp['train'][items]:,} {items} / {sp['train']['tokens']:,} tokens, "
          f"val {sp['val'][items]:,} / {sp['val']['tokens']:,}")
    print(f"wrote {out_dir} in {s['seconds']:.1f}s (report.json beside the bins)")
