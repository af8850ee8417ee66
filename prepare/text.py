"""Prepare raw text (a pretraining corpus) into data/NAME: a text dataset, what train.py's
objective=lm trains on.

    python prepare/text.py --input=../shared/data/brown/brown.jsonl.gz --out_dir=data/brown
    python prepare/text.py --input=books/                # every .txt file under the folder, one document each
    python prepare/text.py --input=hub:HuggingFaceFW/fineweb-edu --subset=sample-10BT --max_tokens=10000000000

SOURCE is read as prepare/chat.py reads it (sources.py): a .txt file is one document; a row
of .jsonl(.gz), .json, .parquet or .csv is one document, the text of its --text_field
(default text). Each document is encoded with GPT-2's BPE as ordinary text (a literal
'<|endoftext|>' inside it stays text) and followed by <|endoftext|>; it goes to train or val
by a hash of its text (--val_fraction, --seed), and each split's documents fill shards of at
most --shard_tokens tokens: whole documents, as many as fit (one longer than that is a shard
of its own), in the format data.py defines. The text is kept as written. Empty documents,
binary ones (NUL characters) and exact duplicates are dropped, malformed records skipped,
each counted in report.json with its first lines. --max_tokens stops at the first document
that would take the dataset past that many tokens; the rest of the source is not read.

A killed run resumes. The dataset is built in a work folder beside out_dir (.NAME.text-work/):
each shard is appended to `<shard>.partial` and renamed to its name when full, and
progress.json then records what the run has consumed (source files and records), its counts,
and how far the partly filled shards and the digests of the documents kept go. Rerunning the
same command continues from the last finished shard, and the result is the same byte for
byte; a work folder of another source or other options is refused. At the end meta.json and
report.json are written and the dataset replaces out_dir in one rename (common.replace_dir).

Memory stays bounded whatever the source's size: documents stream from the reader to a few
chunks being tokenised (pipeline.ordered_map) and are appended to their shard file at once,
so no shard is held in memory; a .txt document is read whole. The duplicate check keeps 8
bytes per slot of a table at most 70% full: 11 to 23 bytes per document kept, about 2 GB
for 100M documents (FineWeb-Edu's 10B-token sample holds about 10M).
"""

import fcntl
import json
import os
import shutil
import time
from array import array
from collections import Counter, deque
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

# pipeline first: it puts the repository root on sys.path
from pipeline import FIRST_LINES, Report, check_args, digest, hashed_in_val, ordered_map, parser, print_reasons

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import sources  # noqa: E402
import tokenizer  # noqa: E402
from chat import dataset_name  # noqa: E402
from common import GrafitoError, current_version, replace_dir, run_cli  # noqa: E402
from configurator import check_options, integer  # noqa: E402

PROGRESS_VERSION = 1  # of progress.json: a work folder of another version is refused
PEEK_ROWS = 100  # rows whose fields are checked for --text_field before the run
CHUNK_DOCUMENTS = 1024  # a chunk of work for a tokenising process: this many documents
CHUNK_CHARACTERS = 1 << 18  # ... or this much text, whichever comes first
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- source -> documents

@dataclass
class Document:
    """One row of the source as the writer meets it, in source order."""
    where: object  # its line (one file) or "file:line", for the report
    file: int  # the index of its file in the source
    record: int  # its record number in that file (the reader counts malformed records too)
    skips: "Skips"  # the malformed records read since the document before it
    text: str = None  # None: no document, only the skips at the source's end


class Skips:
    """The malformed records read between two documents: the first few of each reason in full
    (all the report keeps), the others only counted, so that a long run of them takes no memory."""

    def __init__(self):
        self.first, self.kept, self.more = [], Counter(), Counter()

    def add(self, reason, where, detail=""):
        if self.kept[reason] < FIRST_LINES:
            self.first.append((reason, where, detail))
            self.kept[reason] += 1
        else:
            self.more[reason] += 1

    def count_into(self, report):
        for reason, where, detail in self.first:
            report.read += 1
            report.skip(reason, where, detail)
        for reason, n in self.more.items():
            report.read += n
            report.skipped[reason] += n


class FileReport:
    """What a sources.py reader counts into, for one file: it counts the file's records, passes
    over the first `done` (consumed before a resume) and keeps the skips of the others, to be
    counted in the report in source order, when the writer reaches them."""

    def __init__(self, name, several, done, skips):
        self.name, self.several, self.done, self.skips = name, several, done, skips
        self.read = 0

    def where(self, line):
        return f"{self.name}:{line}" if self.several else line

    def skip(self, reason, line, detail=""):
        if self.read > self.done:
            self.skips.add(reason, self.where(line), detail)


def read_documents(source, text_field, start=(0, 0)):
    """A Document per row of the source from start = (file index, records of it consumed),
    then one without text that carries the skips after the last document."""
    first, done = start
    several, skips = len(source.names) > 1, Skips()
    for index, (name, path) in enumerate(source.files(first), start=first):
        report = FileReport(name, several, done if index == first else 0, skips)
        column = "text" if sources.format_of(name) == ".txt" else text_field
        with closing(sources.read_file(path, report, columns=[column])) as rows:
            for line, row in rows:
                if report.read <= report.done:
                    continue
                text, problem = text_of(row, column)
                if problem:
                    report.skips.add(problem[0], report.where(line), problem[1])
                    continue
                yield Document(report.where(line), index, report.read, report.skips, text)
                report.skips = Skips()
        skips = report.skips
    yield Document(None, len(source.names), 0, skips)


def text_of(row, column):
    """(the row's text, None) or (None, (skip reason, detail))."""
    if not isinstance(row, dict):
        return None, ("not_an_object", type(row).__name__)
    value = row.get(column)
    if value is None:
        return None, ("missing_field", column)
    if not isinstance(value, str):
        return None, ("not_text", f"{column} is a {type(value).__name__}")
    return value, None


def check_text_field(source, text_field):
    """Stop before the run if the first rows have no such field, naming the fields they have."""
    if sources.format_of(source.names[0]) == ".txt":
        return
    rows = sources.peek(source, PEEK_ROWS)
    objects = [row for row in rows if isinstance(row, dict)]
    if rows and not any(isinstance(row.get(text_field), str) for row in objects):
        seen = Counter(key for row in objects for key in row)
        raise GrafitoError(f"{source.label}: none of the first {len(rows)} records has a text field {text_field!r}; "
                           f"their fields: {', '.join(seen) or 'none (they are not JSON objects)'}; name the one "
                           f"holding the text with --text_field")


# ----------------------------------------------------------------------------- documents -> tokens (worker processes)

def encode_documents(texts, val_fraction, seed):
    """Per text: (drop reason or None, 64-bit digest, goes to val, uint16 token ids ending with
    <|endoftext|>). A pure function of its arguments: it runs in worker processes."""
    out = []
    for text in texts:
        if text is None:
            out.append(None)
        elif not text.strip():
            out.append(("empty", 0, False, None))
        elif "\x00" in text:  # binary data, or UTF-16 text, read as UTF-8
            out.append(("binary", 0, False, None))
        else:
            ids = np.array(tokenizer.encode(text) + [tokenizer.EOT], dtype=data.TOKEN_DTYPE)
            out.append((None, digest(text), hashed_in_val(text, val_fraction, seed), ids))
    return out


def chunks_of(documents, pending):
    """Lists of texts for encode_documents; each chunk's Documents go to `pending` as it is handed out."""
    chunk, size = [], 0
    for document in documents:
        chunk.append(document)
        size += len(document.text or "")
        if len(chunk) >= CHUNK_DOCUMENTS or size >= CHUNK_CHARACTERS:
            pending.append(chunk)
            yield [d.text for d in chunk]
            chunk, size = [], 0
    if chunk:
        pending.append(chunk)
        yield [d.text for d in chunk]


def encoded(documents, workers, val_fraction, seed):
    """(Document, encode_documents' result) for every document, in source order, the encoding
    done by `workers` processes a few chunks ahead."""
    pending = deque()
    for results in ordered_map(encode_documents, chunks_of(documents, pending), workers, val_fraction, seed):
        yield from zip(pending.popleft(), results)


# ----------------------------------------------------------------------------- duplicates

class DigestSet:
    """A set of 64-bit digests in one numpy array: open addressing with linear probing, kept at
    most MAX_LOAD full, 8 bytes a slot (a Python set of ints takes about 70 bytes an item)."""
    MAX_LOAD = 0.7

    def __init__(self, slots=1 << 16):
        self.table = np.zeros(slots, dtype=np.uint64)  # 0: an empty slot
        self.count = 0

    def add(self, value):
        """True if value is new (it is then remembered), False if it was seen."""
        value = value or 1
        table, mask = self.table, len(self.table) - 1
        i = value & mask
        while (slot := int(table[i])) != 0:
            if slot == value:
                return False
            i = (i + 1) & mask
        table[i] = value
        self.count += 1
        if self.count > self.MAX_LOAD * len(table):
            self._resize(2 * len(table))
        return True

    def add_new(self, values):
        """Remember many values, none of them seen before and all different (a resumed run's)."""
        values = np.asarray(values, dtype=np.uint64)
        values = np.where(values == 0, np.uint64(1), values)
        slots = len(self.table)
        while self.count + len(values) > self.MAX_LOAD * slots:
            slots *= 2
        if slots != len(self.table):
            self._resize(slots)
        self._place(values)
        self.count += len(values)

    def _resize(self, slots):
        kept = self.table[self.table != 0]
        self.table = np.zeros(slots, dtype=np.uint64)
        self._place(kept)

    def _place(self, values):
        """Insert distinct new values, all at once: each round, every value still unplaced looks
        at its next slot, and of those wanting the same free slot the first takes it."""
        table, mask = self.table, np.uint64(len(self.table) - 1)
        position = (values & mask).astype(np.int64)
        todo = np.arange(len(values))
        while len(todo):
            slots = position[todo]
            free = np.flatnonzero(table[slots] == 0)
            taken, first = np.unique(slots[free], return_index=True)
            table[taken] = values[todo[free[first]]]
            unplaced = np.ones(len(todo), dtype=bool)
            unplaced[free[first]] = False
            todo = todo[unplaced]
            position[todo] = (position[todo] + 1) & int(mask)


# ----------------------------------------------------------------------------- the work folder

class SplitShards:
    """One split's shards in the work folder's dataset/: the finished ones (meta.json's entries)
    and the one being filled, appended to `<shard>.partial`, renamed to its name when full."""

    def __init__(self, folder, split, state):
        self.folder, self.split = folder, split
        self.entries = state["shards"]
        partial = state["partial"]
        self.documents, self.tokens, self.max_token_id = partial["documents"], partial["tokens"], partial["max_token_id"]
        for entry in self.entries:
            if not (folder / entry["file"]).is_file() or (folder / entry["file"]).stat().st_size != 2 * entry["tokens"]:
                raise DamagedWork(f"{entry['file']} is missing or not {entry['tokens']:,} tokens long")
        path, finished = self._partial_path(), folder / self._name()
        if finished.exists():  # renamed as full, but the run died before progress.json said so
            os.replace(finished, path)
        if self.tokens and (not path.is_file() or path.stat().st_size < 2 * self.tokens):
            raise DamagedWork(f"{path.name} holds fewer than the {self.tokens:,} tokens progress.json records")
        self.file = open(path, "r+b" if self.tokens else "wb")
        self.file.truncate(2 * self.tokens)  # what was appended after the last finished shard is read again
        self.file.seek(2 * self.tokens)

    def _name(self):
        return data.shard_file(self.split, len(self.entries))

    def _partial_path(self):
        return self.folder / (self._name() + ".partial")

    def fits(self, n, shard_tokens):
        return self.tokens == 0 or self.tokens + n <= shard_tokens

    def add(self, ids):
        self.file.write(ids.tobytes())
        self.documents += 1
        self.tokens += len(ids)
        self.max_token_id = max(self.max_token_id, int(ids.max()))

    def finish(self):
        """The shard being filled becomes a finished shard; a new one starts."""
        self.sync()
        self.file.close()
        os.replace(self._partial_path(), self.folder / self._name())
        self.entries.append({"file": self._name(), "documents": self.documents, "tokens": self.tokens,
                             "max_token_id": self.max_token_id})
        self.documents = self.tokens = self.max_token_id = 0
        self.file = open(self._partial_path(), "wb")

    def close(self):
        """At the end: the last shard is finished if it holds anything."""
        if self.tokens:
            self.finish()
        self.file.close()
        self._partial_path().unlink(missing_ok=True)

    def sync(self):
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())

    def state(self):
        return {"shards": self.entries,
                "partial": {"documents": self.documents, "tokens": self.tokens, "max_token_id": self.max_token_id}}


class DamagedWork(GrafitoError):
    pass


FRESH = {"position": [0, 0], "records_done": 0, "report": None, "digests": 0, "longest": 0, "stopped": False,
         "finished": False, "consumed": [], "splits": {s: {"shards": [], "partial": {"documents": 0, "tokens": 0,
                                                                                   "max_token_id": 0}} for s in SPLITS}}


class Work:
    """The work folder of one out_dir: progress.json, digests.bin (the digest of every document
    kept, in order), a lock, and dataset/, the folder that becomes out_dir."""

    def __init__(self, out_dir, settings):
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir.with_name(f".{self.out_dir.name}.text-work")
        self.dataset, self.progress_path = self.folder / "dataset", self.folder / "progress.json"
        self.settings = settings

    def open(self):
        """The state to start from: the last finished shard of an earlier run of this command, or
        nothing done. Refuses the work of another source or other options."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.folder / "lock", "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise GrafitoError(f"another prepare is writing {self.folder} (the same --out_dir); wait for it to end") from None
        state = self._read_progress()
        if state is None:
            for path in self.folder.iterdir():
                if path.name != "lock":
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            self.dataset.mkdir()
            (self.folder / "digests.bin").touch()
            state = json.loads(json.dumps(FRESH))
            self.save(state)
        return state

    def _read_progress(self):
        try:
            state = json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return None  # nothing done yet, or killed before the first save finished
        if not isinstance(state, dict) or not self.dataset.is_dir():
            return None
        if state.get("version") != PROGRESS_VERSION:
            raise GrafitoError(f"{self.folder} holds the work of another version of prepare/text.py (progress version "
                               f"{state.get('version')}); delete it to start over")
        changed = [key for key in self.settings if state.get("settings", {}).get(key) != self.settings[key]]
        if changed:
            raise GrafitoError(f"{self.folder} holds an unfinished prepare of {differences(state, changed)}: rerun "
                               f"that command to finish it, or delete {self.folder} to start over with this one")
        return state

    def save(self, state):
        """progress.json replaced in one rename, after the data it counts is on disk."""
        state = {"version": PROGRESS_VERSION, "settings": self.settings, **state}
        tmp = self.progress_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(state, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.progress_path)

    def swap_into_place(self):
        replace_dir(self.dataset, self.out_dir)
        self.lock.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self):
        self.lock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def differences(state, changed):
    """How a work folder's settings differ from this command's, for the refusal."""
    old = state.get("settings", {})
    if "source" in changed:
        source = old.get("source", {})
        if "hub_dataset" in source:
            what = f"hub:{source['hub_dataset']} at commit {source.get('commit')}"
        else:
            paths = [f.get("path") for f in source.get("files", [])]
            what = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
        return f"another source ({what}; or its files changed since)"
    return "other options (" + ", ".join(f"--{key} {old.get(key)}" for key in changed) + ")"


# ----------------------------------------------------------------------------- the run

class Run:
    """The writer's side of a run, in source order: counts, the duplicate check, the shards,
    and the checkpoints that let a killed run resume."""

    def __init__(self, args, source, work, state):
        self.args, self.source, self.work, self.state = args, source, work, state
        try:
            self.splits = {split: SplitShards(work.dataset, split, state["splits"][split]) for split in SPLITS}
            self.digests = open(work.folder / "digests.bin", "r+b")
            if self.digests.seek(0, os.SEEK_END) < 8 * state["digests"]:
                raise DamagedWork(f"digests.bin holds fewer than the {state['digests']:,} digests progress.json records")
        except (DamagedWork, OSError) as err:
            raise GrafitoError(f"{work.folder} is damaged ({err}); delete it to start over") from None
        self.digests.truncate(8 * state["digests"])
        self.digests.seek(0)
        self.seen = DigestSet()
        self.seen.add_new(np.fromfile(self.digests, dtype=np.uint64, count=state["digests"]))
        self.digests.seek(0, os.SEEK_END)
        self.new_digests = array("Q")  # of the documents kept since the last checkpoint
        self.report = Report(source.label, strict=args.strict)
        if state["report"]:
            restore_report(self.report, state["report"])
        self.tokens = self.tokens_at_start = sum(s.tokens + sum(e["tokens"] for e in s.entries)
                                                 for s in self.splits.values())
        self.longest, self.stopped, self.position = state["longest"], state["stopped"], tuple(state["position"])

    def add(self, document, result):
        """Count and write one document (and the skips before it); False once --max_tokens stops the run."""
        report = self.report
        document.skips.count_into(report)
        if document.text is None:
            self.position = (len(self.source.names), 0)
            return False
        drop, value, val, ids = result
        reason = drop or (None if self.seen.add(value) else "duplicate")
        if reason:
            report.read += 1
            report.drop(reason, document.where)
            return True
        before = (document.file, document.record - 1)  # where a resume reads this document again
        if self.args.max_tokens and self.tokens + len(ids) > self.args.max_tokens:
            self.stopped, self.position = True, before
            return False
        shards = self.splits["val" if val else "train"]
        if not shards.fits(len(ids), self.args.shard_tokens):
            shards.finish()
            self.checkpoint(before)
        report.read += 1
        self.new_digests.append(value or 1)
        shards.add(ids)
        self.tokens += len(ids)
        self.longest = max(self.longest, len(ids))
        return True

    def checkpoint(self, position, finished=False):
        """After a shard is finished: what it and the partly filled shards hold goes to disk, then
        progress.json says how far the run got."""
        self.position = position
        for shards in self.splits.values():
            shards.sync()
        self.digests.write(self.new_digests.tobytes())
        self.digests.flush()
        os.fsync(self.digests.fileno())
        state, report = self.state, self.report
        recorded = {c["shard"] for c in state["consumed"]}
        names = self.source.names
        state["consumed"] += [{"shard": e["file"], "records": report.read, "file": names[position[0]]
                               if position[0] < len(names) else None, "record": position[1]}
                              for s in self.splits.values() for e in s.entries if e["file"] not in recorded]
        state.update(position=list(position), records_done=report.read, report=report_state(report),
                     digests=state["digests"] + len(self.new_digests), longest=self.longest, stopped=self.stopped,
                     finished=finished, splits={split: shards.state() for split, shards in self.splits.items()})
        self.new_digests = array("Q")
        self.work.save(state)

    def has(self, split):
        return bool(self.splits[split].documents or self.splits[split].entries)

    def finish(self, described):
        """The last shards finished and recorded; the dataset's meta.json (described: the source's)."""
        for shards in self.splits.values():
            shards.close()
        self.checkpoint(self.position, finished=True)
        self.digests.close()
        return data.text_meta(dataset_meta(self.args, described, self.report, self.stopped),
                              {split: shards.entries for split, shards in self.splits.items()})

    def abandon(self):
        for shards in self.splits.values():
            shards.file.close()
        self.digests.close()
        self.work.discard()


def prepare(args, source):
    """Read, tokenise, split and shard the source into args.out_dir, resuming the work of an
    earlier run of the same command; print the summary and save it as report.json."""
    started = time.perf_counter()
    described = source.describe()
    settings = {"source": source_identity(described), "text_field": args.text_field,
                "shard_tokens": args.shard_tokens, "max_tokens": args.max_tokens, "val_fraction": args.val_fraction,
                "seed": args.seed, "strict": args.strict}
    work = Work(args.out_dir, settings)
    state = work.open()
    run = Run(args, source, work, state)
    resumed = {"shards": sum(len(s["shards"]) for s in state["splits"].values()),
               "records": state["records_done"]} if state["records_done"] else None
    if resumed:
        print(f"resuming the prepare in {work.folder}: {resumed['shards']} shard(s) finished, "
              f"{resumed['records']:,} records of the source done")
    else:
        print(f"writing shards into {work.folder} (a killed run resumes there: rerun the same command)")
    done = run.stopped or state["finished"]
    documents = iter(()) if done else read_documents(source, args.text_field, run.position)
    file = None
    with tqdm(total=args.max_tokens or None, initial=run.tokens, unit="tok", unit_scale=True, desc="tokenizing",
              mininterval=0.5) as bar:
        for document, result in encoded(documents, args.workers, args.val_fraction, args.seed):
            before = run.tokens
            if not run.add(document, result):
                break
            bar.update(run.tokens - before)
            if document.file != file:
                file = document.file
                bar.set_postfix_str(f"file {file + 1}/{len(source.names)}", refresh=False)
    if not run.has("train"):
        run.abandon()
        raise nothing_kept(run.report, args, run.has("val"))
    meta = run.finish(described)
    (work.dataset / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - started
    summary = make_summary(run.report, meta, run.longest, run.stopped, resumed, seconds,
                           run.tokens - run.tokens_at_start)
    (work.dataset / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    work.swap_into_place()
    print_summary(summary, args.out_dir)
    return summary


def report_state(report):
    return {"read": report.read, "skipped": report.skipped, "dropped": report.dropped, "lines": report.lines}


def restore_report(report, saved):
    report.read = saved["read"]
    report.skipped.update(saved["skipped"])
    report.dropped.update(saved["dropped"])
    report.lines.update({reason: list(lines) for reason, lines in saved["lines"].items()})


def nothing_kept(report, args, val_only):
    """Never write a dataset without training text: say where the records went."""
    lost = {**report.skipped, **report.dropped}
    reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(lost.items(), key=lambda kv: -kv[1]))
    why = reasons or ("every document went to val" if val_only else "the source holds no records")
    if val_only and reasons:
        why += "; the rest went to val"
    return GrafitoError(f"{report.source}: no document is left for the train split ({report.read:,} records read; "
                        f"{why}); nothing written, {args.out_dir} is unchanged")


def source_identity(described):
    """What must stay the same for a run to resume: the local files (where they are and their
    sha256), or the hub commit and files (not the revision asked for: pinning a branch's commit
    with @COMMIT resumes a run that read the branch)."""
    if "hub_dataset" in described:
        return {key: value for key, value in described.items() if key != "revision"}
    return {"files": [{"path": str(Path(f["path"]).resolve()), "sha256": f["sha256"]} for f in described["files"]]}


def dataset_meta(args, described, report, stopped):
    """meta.json's description of the text dataset (data.text_meta adds the kind and the splits)."""
    return {"dataset": Path(args.out_dir).name, "tokenizer": "gpt2 (tiktoken)", "vocab_size": tokenizer.VOCAB_SIZE,
            "source": {**described, "text_field": args.text_field}, "shard_tokens": args.shard_tokens,
            "max_tokens": args.max_tokens, "stopped_at_max_tokens": stopped, "val_fraction": args.val_fraction,
            "seed": args.seed, "records_read": report.read, "skipped_malformed": dict(report.skipped),
            "dropped": dict(report.dropped)}


def make_summary(report, meta, longest, stopped, resumed, seconds, new_tokens):
    splits = meta["splits"]
    return {
        "source": report.source,
        "records_read": report.read,
        "skipped_malformed": dict(report.skipped),
        "repaired": {},
        "dropped": dict(report.dropped),
        "first_lines": dict(report.lines),
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "longest_document_tokens": longest,
        "stopped_at_max_tokens": stopped,
        "splits": {split: {"documents": s["documents"], "tokens": s["tokens"], "shards": len(s["shards"])}
                   for split, s in splits.items()},
        "resumed": resumed,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9)),
    }


def print_summary(s, out_dir):
    print_reasons(s)
    sp = s["splits"]
    print(f"kept {s['documents']:,} documents, {s['tokens']:,} tokens (longest document {s['longest_document_tokens']:,})"
          f"{'; stopped at --max_tokens' if s['stopped_at_max_tokens'] else ''}")
    print(", ".join(f"{split} {counts['documents']:,} documents / {counts['tokens']:,} tokens in {counts['shards']} "
                    f"shard{'s' if counts['shards'] != 1 else ''}" for split, counts in sp.items()))
    print(f"wrote {out_dir} in {s['seconds']:.1f}s ({s['tokens_per_second']:,} tokens/s"
          f"{', resumed' if s['resumed'] else ''}; report.json beside the shards)")


# ----------------------------------------------------------------------------- the command

def check_out_dir(out_dir):
    """A text dataset replaces only a text dataset: refuse to put one over conversations or pairs."""
    meta_path = current_version(out_dir) / "meta.json"
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        print(f"note: {meta_path} is unreadable; the dataset there is replaced")
        return
    kind = data.dataset_kind(meta)
    if kind != "text":
        what = {"sft": "an SFT dataset (conversations)", "pairs": "a preference-pairs dataset"}.get(kind, f"a {kind!r} dataset")
        raise GrafitoError(f"--out_dir {out_dir} holds {what}; a text dataset would replace it: choose another "
                           f"--out_dir, or remove it first")
    if meta.get("format_version") != data.FORMAT_VERSION:
        print(f"note: {out_dir} holds a text dataset of format version {meta.get('format_version')} (this grafito "
              f"reads {data.FORMAT_VERSION}); it is replaced")


def main():
    p = parser("Prepare raw text (a pretraining corpus) into token shards for objective=lm.", None, None,
               sources_input=True, item="document")
    p.add_argument("--text_field", default="text", help="the field holding a row's text (default %(default)s)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000,
                   help="most tokens in a shard file, whole documents (default %(default)s)")
    p.add_argument("--max_tokens", type=int, default=0,
                   help="stop before the document that would take the dataset past this many tokens (default 0: all)")
    args = p.parse_args()
    args.out_dir = args.out_dir or data.DATA_ROOT / dataset_name(args.input, False)
    check_options(vars(args), {"shard_tokens": integer(1), "max_tokens": integer(0)})
    check_out_dir(args.out_dir)
    check_args(args)
    source = sources.resolve(args.input, args.split, args.subset)
    check_text_field(source, args.text_field)
    return prepare(args, source)


if __name__ == "__main__":
    run_cli(main)
