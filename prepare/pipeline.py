"""What the prepare scripts share: the command line, fetching the source (download or
--input), reading JSON lines, cleaning, the report, tokenising and writing the dataset.

A script parses its source into Records (the source line and a list of (instruction,
answer) turns), counting what it skips, and hands them to build_dataset().
"""

import argparse
import gzip
import http.client
import hashlib
import json
import re
import sys
import tempfile
import time
import unicodedata
import urllib.request
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import tokenizer  # noqa: E402
from common import GrafitoError  # noqa: E402
from configurator import SEED, check_options, integer, number  # noqa: E402

DOWNLOAD_CACHE = Path.home() / ".cache" / "grafito"
FIRST_LINES = 5  # line numbers kept per skip/drop reason in the report


@dataclass
class Record:
    line: int  # where the record starts in the source (1-based)
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
            raise GrafitoError(f"{self.source}, line {line}: {reason.replace('_', ' ')}"
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

def parser(description, name, block_size):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--input", type=user_path, help="a local file in the source's format, instead of downloading")
    p.add_argument("--out_dir", type=user_path, default=data.DATA_ROOT / name, help=f"default: data/{name}")
    p.add_argument("--block_size", type=int, default=block_size,
                   help="longest conversation in tokens, end-of-text included (default %(default)s)")
    p.add_argument("--overlong", choices=["drop", "truncate"], default="truncate",
                   help="over-long conversations: drop them, or keep the turns that fit (default %(default)s)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of conversations in val (default %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="salts the hash that assigns the val split")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record instead of skipping it (repairs, e.g. of mojibake, are still made and counted)")
    return p


def user_path(text):
    return Path(text).expanduser()


def check_args(args):
    check_options(vars(args), {"block_size": integer(8, 1 << 20), "val_fraction": number(0.0, 1.0, high_open=True),
                               "seed": SEED})
    if args.input is not None and not args.input.is_file():
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


# ----------------------------------------------------------------------------- sources

def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(url, sha256, filename):
    """Download url into ~/.cache/grafito (once), verify its sha256, return the path."""
    DOWNLOAD_CACHE.mkdir(parents=True, exist_ok=True)
    path = DOWNLOAD_CACHE / filename
    if path.exists() and sha256_of(path) == sha256:
        return path
    partial = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {filename}") as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:  # HTTPException: e.g. the connection dropped mid-file
        partial.unlink(missing_ok=True)
        raise GrafitoError(f"cannot download {url} ({type(err).__name__}: {err}); offline, pass a local copy "
                           f"with --input PATH") from None
    actual = sha256_of(partial)
    if actual != sha256:
        partial.unlink()
        raise GrafitoError(f"{url}: sha256 {actual} does not match the pinned {sha256}")
    partial.replace(path)
    return path


def fetch_hub_dataset(repo_id, filename):
    import hub

    return hub.download(repo_id, filename, repo_type="dataset",
                        local_hint="Pass a local copy of the file with --input PATH.")


def read_json_lines(path, report, required_keys):
    """(line number, object) for every JSON line of a .jsonl or .jsonl.gz file.

    Bad JSON, non-UTF-8 and records missing a required key are counted skips; a file that is
    empty, truncated, or where no record has the required keys is an error.
    """
    path = Path(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    records, line_no = [], 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                report.read += 1
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    report.skip("invalid_utf8", line_no)
                    continue
                except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep to read
                    report.skip("bad_json", line_no, f"{type(err).__name__}: {err}"[:200])
                    continue
                if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in required_keys):
                    report.skip("missing_key", line_no, f"needs string fields {', '.join(required_keys)}")
                    continue
                records.append((line_no, obj))
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise GrafitoError(f"{path}: unreadable, corrupt or truncated after line {line_no} ({type(err).__name__}: "
                           f"{err}); download it again") from None
    if report.read == 0:
        raise GrafitoError(f"{path}: no records (empty file)")
    if not records:
        raise GrafitoError(f"{path}: none of {report.read} records has the fields {', '.join(required_keys)}; "
                           f"is this the right file?")
    return records


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


def clean_records(records, report, detokenize=False, check_context=False):
    """Normalise every turn, then drop what should not be trained on; duplicates last."""
    kept, seen_exact, seen_normalized = [], set(), set()
    for record in tqdm(records, desc="cleaning", unit="conv", leave=False, mininterval=0.5):
        turns, changed = clean_turns(record.turns, detokenize)
        for name in sorted(changed):
            report.repair(name, record.line)
        if len(turns) > 1 and not turns[-1][1]:
            turns = turns[:-1]
            report.repair("empty_last_answer_removed", record.line)
        reason = _drop_reason(turns, check_context)
        if reason:
            report.drop(reason, record.line)
            continue
        exact = tuple(turns)
        if exact in seen_exact:
            report.drop("duplicate_exact", record.line)
            continue
        key = dedup_key(turns)
        if key in seen_normalized:
            report.drop("duplicate_normalized", record.line)
            continue
        seen_exact.add(exact)
        seen_normalized.add(key)
        kept.append(Record(record.line, turns))
    return kept


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


# ----------------------------------------------------------------------------- tokenise, split, write

def in_val(turns, fraction, seed):
    """Deterministic split by a hash of the conversation: reruns and new data never move a sample."""
    digest = hashlib.sha256(f"{seed}\x1d{dedup_key(turns)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def tokenize(records, block_size, overlong, report):
    """(record, ids, mask) per record; over-long ones dropped or cut at a turn boundary."""
    rendered = []
    chunk = 2048
    with tqdm(total=len(records), desc="tokenizing", unit="conv", mininterval=0.5) as bar:
        for start in range(0, len(records), chunk):
            part = records[start:start + chunk]
            rendered += tokenizer.render_batch([r.turns for r in part])
            bar.update(len(part))
    out = []
    for record, (ids, mask) in zip(records, rendered):
        if len(ids) > block_size:
            turns = record.turns
            while overlong == "truncate" and len(turns) > 1 and len(ids) > block_size:
                turns = turns[:-1]
                ids, mask = tokenizer.render(turns)
            if len(ids) > block_size:
                report.drop("longer_than_block_size", record.line)
                continue
            report.repair("truncated_at_turn_to_fit_block_size", record.line)
            record = Record(record.line, turns)
        out.append((record, ids, mask))
    return out


def dataset_meta(name, source, args, extra_meta):
    """meta.json's description of a prepared dataset (SFT or pairs): where it came from and how it was made."""
    return {
        "dataset": name, "tokenizer": "gpt2 (tiktoken)", "vocab_size": tokenizer.VOCAB_SIZE,
        "eot_token": tokenizer.EOT, "template": tokenizer.TEMPLATE, "source": source,
        "block_size": args.block_size, "overlong": args.overlong, "val_fraction": args.val_fraction,
        "seed": args.seed, **(extra_meta or {}),
    }


def check_train_split(splits, report, args, item):
    """Never replace a dataset with nothing: stop, saying where the records went."""
    if splits["train"]:
        return
    lost = {**report.skipped, **report.dropped}
    reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(lost.items(), key=lambda kv: -kv[1]))
    raise GrafitoError(f"{report.source}: no {item} is left for the train split ({report.read:,} records read; "
                       f"{reasons or ('all went to val' if report.read else 'the input holds none')}); nothing "
                       f"written, {args.out_dir} is unchanged")


def build_dataset(args, name, records, report, source, detokenize=False, check_context=False, extra_meta=None):
    """Clean, tokenise, split and write; print the report and save it beside the data."""
    started = time.perf_counter()
    kept = clean_records(records, report, detokenize, check_context)
    tokenized = tokenize(kept, args.block_size, args.overlong, report)
    splits = {"train": [], "val": []}
    for record, ids, mask in tokenized:
        splits["val" if in_val(record.turns, args.val_fraction, args.seed) else "train"].append((record, ids, mask))
    meta = dataset_meta(name, source, args, extra_meta)
    check_train_split(splits, report, args, "conversation")
    written = data.write_dataset(args.out_dir, {s: [(ids, mask) for _, ids, mask in rows] for s, rows in splits.items()}, meta)
    summary = make_summary(report, splits, written, time.perf_counter() - started)
    (Path(args.out_dir) / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, args.out_dir)
    return summary


def make_summary(report, splits, meta, seconds):
    rows = [row for split in splits.values() for row in split]
    lengths = np.array([len(ids) for _, ids, _ in rows]) if rows else np.zeros(1)
    tokens = int(lengths.sum()) if rows else 0
    supervised = sum(sum(mask) for _, _, mask in rows)
    return {
        "source": report.source,
        "records_read": report.read,
        "skipped_malformed": dict(report.skipped),
        "repaired": dict(report.repaired),
        "dropped": dict(report.dropped),
        "first_lines": {k: v for k, v in report.lines.items()},
        "conversations": len(rows),
        "turns": sum(len(record.turns) for record, _, _ in rows),
        "tokens": tokens,
        "supervised_fraction": round(supervised / max(tokens, 1), 4),
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
        "splits": meta["splits"],
        "seconds": round(seconds, 2),
    }


def print_reasons(s):
    """The report's counts: records read, then every skip, repair and drop with its first lines."""
    print(f"read {s['records_read']:,} records from {s['source']}")
    for title, key in (("skipped (malformed)", "skipped_malformed"), ("repaired", "repaired"), ("dropped", "dropped")):
        for reason, n in sorted(s[key].items(), key=lambda kv: -kv[1]):
            lines = ", ".join(map(str, s["first_lines"].get(reason, [])))
            print(f"  {title:20s} {reason:44s} {n:7,}   first lines: {lines}")


def print_summary(s, out_dir):
    print_reasons(s)
    sp = s["splits"]
    print(f"kept {s['conversations']:,} conversations ({s['turns']:,} turns), {s['tokens']:,} tokens, "
          f"{s['supervised_fraction']:.1%} supervised; length p50/p90/p99/max "
          f"{'/'.join(str(v) for v in s['length_percentiles'].values())}")
    print(f"train {sp['train']['conversations']:,} conversations / {sp['train']['tokens']:,} tokens, "
          f"val {sp['val']['conversations']:,} / {sp['val']['tokens']:,}")
    print(f"wrote {out_dir} in {s['seconds']:.1f}s (report.json beside the bins)")


# ----------------------------------------------------------------------------- preference pairs

@dataclass
class Pair:
    """A preference record: the conversation both transcripts share, and their two final answers."""
    line: int  # where the record starts in the source (1-based)
    history: list  # [(instruction, answer), ...] before the last instruction
    instruction: str  # the last instruction, which both final answers answer
    chosen: str
    rejected: str

    def turns(self, answer):
        return self.history + [(self.instruction, answer)]


def clean_pairs(pairs, report):
    """clean_records for pairs: both transcripts normalised, the chosen one held to every rule
    of clean_records, the rejected answer only to the format's (a rejected answer that parrots
    the instruction or has no words is what the pair teaches against); then pairs without a
    preference and duplicates dropped."""
    kept, seen_exact, seen_normalized = [], set(), set()
    for pair in tqdm(pairs, desc="cleaning", unit="pair", leave=False, mininterval=0.5):
        chosen, changed = clean_turns(pair.turns(pair.chosen))
        rejected, rejected_changed = clean_turns(pair.turns(pair.rejected))
        for name in sorted(changed | rejected_changed):
            report.repair(name, pair.line)
        reason = _drop_reason(chosen, False) or _rejected_drop_reason(rejected[-1][1])
        if not reason and tokenizer.squash(chosen[-1][1]) == tokenizer.squash(rejected[-1][1]):
            reason = "same_answers_up_to_case_or_punctuation"  # nothing to prefer
        if reason:
            report.drop(reason, pair.line)
            continue
        cleaned = Pair(pair.line, chosen[:-1], chosen[-1][0], chosen[-1][1], rejected[-1][1])
        exact = (tuple(chosen), cleaned.rejected)
        if exact in seen_exact:
            report.drop("duplicate_exact", pair.line)
            continue
        key = f"{dedup_key(chosen)}\x1d{tokenizer.squash(cleaned.rejected)}"
        if key in seen_normalized:
            report.drop("duplicate_normalized", pair.line)
            continue
        seen_exact.add(exact)
        seen_normalized.add(key)
        kept.append(cleaned)
    return kept


def _rejected_drop_reason(answer):
    if not answer:
        return "empty_answer"
    if ROLE_MARKER.search(answer):
        return "role_marker_inside_text"
    return None


def pair_in_val(pair, fraction, seed):
    """in_val by the whole prompt (before any cut): pairs that share a prompt share a split."""
    return in_val(pair.turns(""), fraction, seed)


def tokenize_pairs(pairs, block_size, overlong, report):
    """(pair, prompt ids, chosen answer ids, rejected answer ids) per pair, each answer ending
    with <|endoftext|>. A pair with a row over block_size loses its oldest turns until both
    rows fit (overlong='truncate'; both final answers stay whole), or is dropped."""
    rendered = []
    chunk = 1024
    with tqdm(total=len(pairs), desc="tokenizing", unit="pair", mininterval=0.5) as bar:
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            rendered += tokenizer.render_batch([turns for p in part for turns in (p.turns(p.chosen), p.turns(p.rejected))])
            bar.update(len(part))
    out = []
    for k, pair in enumerate(pairs):
        chosen, rejected = rendered[2 * k], rendered[2 * k + 1]
        longest, cut = max(len(chosen[0]), len(rejected[0])), False
        while overlong == "truncate" and pair.history and longest > block_size:
            pair = replace(pair, history=pair.history[1:])
            chosen, rejected = tokenizer.render_batch([pair.turns(pair.chosen), pair.turns(pair.rejected)])
            longest, cut = max(len(chosen[0]), len(rejected[0])), True
        if longest > block_size:
            report.drop("longer_than_block_size", pair.line)
            continue
        if cut:
            report.repair("oldest_turns_cut_to_fit_block_size", pair.line)
        out.append((pair, *split_pair(pair, chosen, rejected)))
    return out


def split_pair(pair, chosen, rejected):
    """(prompt ids, chosen answer ids, rejected answer ids) from the two rendered rows, whose
    final answers (with their end-of-text) are the last run of supervised tokens."""
    halves = []
    for ids, mask in (chosen, rejected):
        answer_start = len(mask) - mask[::-1].index(0)
        halves.append((ids[:answer_start], ids[answer_start:]))
    (prompt, chosen_answer), (rejected_prompt, rejected_answer) = halves
    if prompt != rejected_prompt:  # render() encodes a prompt apart from its answer, so this cannot differ
        raise GrafitoError(f"line {pair.line}: the chosen and the rejected row do not start with the same prompt "
                           f"ids; tokenizer.render no longer cuts a prompt from its answer")
    return prompt, chosen_answer, rejected_answer


def build_pairs(args, name, pairs, report, source, extra_meta=None):
    """build_dataset for preference pairs: clean, tokenise, split by prompt and write through
    data.write_pairs; print the report and save it beside the data."""
    started = time.perf_counter()
    kept = clean_pairs(pairs, report)
    val = {pair.line: pair_in_val(pair, args.val_fraction, args.seed) for pair in kept}
    splits = {"train": [], "val": []}
    for row in tokenize_pairs(kept, args.block_size, args.overlong, report):
        splits["val" if val[row[0].line] else "train"].append(row)
    meta = dataset_meta(name, source, args, extra_meta)
    check_train_split(splits, report, args, "pair")
    written = data.write_pairs(args.out_dir, {s: [row[1:] for row in rows] for s, rows in splits.items()}, meta)
    summary = make_pairs_summary(report, splits, written, time.perf_counter() - started)
    (Path(args.out_dir) / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_pairs_summary(summary, args.out_dir)
    return summary


def make_pairs_summary(report, splits, meta, seconds):
    rows = [row for split in splits.values() for row in split]

    def percentiles(lengths):
        lengths = np.array(lengths) if lengths else np.zeros(1)
        return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())}

    prompts = [len(prompt) for _, prompt, _, _ in rows]
    answers = [len(answer) for _, _, chosen, rejected in rows for answer in (chosen, rejected)]
    tokens, supervised = 2 * sum(prompts) + sum(answers), sum(answers)
    return {
        "source": report.source,
        "records_read": report.read,
        "skipped_malformed": dict(report.skipped),
        "repaired": dict(report.repaired),
        "dropped": dict(report.dropped),
        "first_lines": {k: v for k, v in report.lines.items()},
        "pairs": len(rows),
        "turns": sum(len(pair.history) + 1 for pair, _, _, _ in rows),
        "tokens": tokens,
        "supervised_fraction": round(supervised / max(tokens, 1), 4),
        "row_length_percentiles": percentiles([len(p) + len(a) for _, p, c, r in rows for a in (c, r)]),
        "prompt_length_percentiles": percentiles(prompts),
        "answer_length_percentiles": percentiles(answers),
        "splits": {s: {"pairs": len(splits[s]), **meta["splits"][s]} for s in splits},
        "seconds": round(seconds, 2),
    }


def print_pairs_summary(s, out_dir):
    print_reasons(s)
    sp = s["splits"]
    print(f"kept {s['pairs']:,} pairs ({s['turns']:,} turns), {s['tokens']:,} tokens in their {2 * s['pairs']:,} rows, "
          f"{s['supervised_fraction']:.1%} supervised")
    for what in ("row", "prompt", "answer"):
        print(f"  {what} length p50/p90/p99/max {'/'.join(str(v) for v in s[f'{what}_length_percentiles'].values())}")
    print(f"train {sp['train']['pairs']:,} pairs / {sp['train']['tokens']:,} tokens, "
          f"val {sp['val']['pairs']:,} / {sp['val']['tokens']:,}")
    print(f"wrote {out_dir} in {s['seconds']:.1f}s (report.json beside the bins)")
