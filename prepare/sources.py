"""Where prepare's rows come from: a SOURCE expanded into files, and one reader per file
format that streams a file's rows with their line numbers. Every prepare script that
reads JSON, Parquet, CSV or text reads through here.

    SOURCE                    the files read, in this order
    chats.jsonl               that file
    a.jsonl b.parquet         those files
    exports/                  every file of a known format under the folder, sorted by path
    'exports/*.jsonl.gz'      the glob's matches, sorted (** also crosses folders)
    hub:ORG/NAME[@REVISION]   the data files of one split (and subset) of a hub dataset, each
                              downloaded through huggingface_hub (its cache, its offline
                              mode) when reading reaches it

    format     a row is                                         numbered by
    .jsonl     a JSON value, one a line                         its line
    .json      an item of the file's JSON list (a .json         the line where it starts
               holding JSON lines is read as .jsonl)
    .parquet   a row, decoded a batch at a time (pyarrow)       its row, from 1
    .csv       a record, keyed by the header's names            the line where it starts
    .txt       the whole file, as {"text": ...}: one document   1

Any file may be gzip-compressed (told by its first bytes, as in x.jsonl.gz). A reader
counts every record in report.read and counts as skips, with their lines, the records
that hold no data (invalid UTF-8, bad JSON, a CSV record with the wrong number of fields);
a file that cannot be read on (corrupt, truncated) is one error. Rows of a source with
several files are numbered "file:line". Memory stays bounded: rows are streamed, except
a .json list, whose text is read whole (JSON lines or Parquet suit big data).
"""

import csv
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import urllib.request
import zlib
from contextlib import closing
from dataclasses import dataclass
from glob import glob
from pathlib import Path

from tqdm import tqdm

import hub
from common import GrafitoError

FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".txt")
PARQUET_BATCH_ROWS = 1024
DOWNLOAD_CACHE = Path.home() / ".cache" / "grafito"
LOCAL_HINT = "Offline, pass a local copy with --input PATH (a file, several files, a folder or a glob)."


def format_of(path):
    """A file's format from its name ('.jsonl' for x.jsonl and x.jsonl.gz), or None."""
    name = Path(path).name.lower().removesuffix(".gz")
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), None)


# ----------------------------------------------------------------------------- SOURCE -> files

@dataclass
class LocalSource:
    """Local files. label names the source in messages and the report; names label the
    files in row numbers ("name:line") when there are several."""
    label: str
    paths: list
    names: list

    def files(self, start=0):
        """(name, path) of each file from the start-th, in reading order."""
        return zip(self.names[start:], self.paths[start:])

    @property
    def sizes(self):
        return [path.stat().st_size for path in self.paths]

    def describe(self):
        """The source as meta.json records it."""
        with tqdm(total=sum(self.sizes), unit="B", unit_scale=True, desc="sha256", disable=sum(self.sizes) < 1 << 28) as bar:
            return {"files": [{"path": str(path), "sha256": sha256_of(path, bar.update)} for path in self.paths]}


@dataclass
class HubSource:
    """The data files of one split of a hub dataset, pinned to one commit; each is
    downloaded into huggingface_hub's cache when files() reaches it."""
    label: str
    repo_id: str
    revision: str  # as asked for (a branch, tag or commit), or None: the default branch
    commit: str  # what it resolved to when listed
    subset: str
    split: str
    names: list
    sizes: list  # bytes, or None where the hub did not say

    def files(self, start=0):
        for name in self.names[start:]:
            yield name, hub.download(self.repo_id, name, repo_type="dataset", revision=self.commit, local_hint=LOCAL_HINT)

    def describe(self):
        return {"hub_dataset": self.repo_id, "revision": self.revision, "commit": self.commit, "subset": self.subset,
                "split": self.split, "files": self.names}


def resolve(inputs, split=None, subset=None):
    """The source named by --input's values: local files, folders and globs, or one hub dataset
    (split defaults to train there; --split and --subset apply to hub datasets only)."""
    if any(text.startswith("hub:") for text in inputs):
        if len(inputs) > 1:
            raise GrafitoError("--input hub:ORG/NAME is a source on its own; prepare other files into another "
                               "--out_dir (train.py can mix prepared datasets)")
        return hub_source(inputs[0], split or "train", subset)
    if split or subset:
        raise GrafitoError("--split and --subset choose the files of a hub dataset (--input hub:ORG/NAME); leave them "
                           "out for local files")
    return local_source(inputs)


def local_source(inputs):
    paths = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and format_of(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise GrafitoError(f"--input {text}: the folder holds no {', '.join(FORMATS)} file")
        elif path.is_file():
            if not format_of(path):
                raise GrafitoError(f"--input {text}: unknown format; name the file .jsonl, .json, .parquet, .csv or "
                                   f".txt (.gz after it if compressed)")
            found = [path]
        elif re.search(r"[*?[]", text):
            found = sorted(Path(p) for p in glob(str(path), recursive=True) if Path(p).is_file() and format_of(p))
            if not found:
                raise GrafitoError(f"--input {text}: no .jsonl, .json, .parquet, .csv or .txt file matches")
        else:
            raise GrafitoError(f"--input {text}: no such file or folder")
        paths += found
    paths = list(dict.fromkeys(paths))  # a file named twice is read once
    if len(paths) == 1:
        return LocalSource(str(paths[0]), paths, [paths[0].name])
    parent = Path(os.path.commonpath([p.resolve() for p in paths]))
    return LocalSource(f"{len(paths)} files under {parent}", paths, [str(p.resolve().relative_to(parent)) for p in paths])


# ----------------------------------------------------------------------------- hub datasets

NOT_DATA = re.compile(r"(?i)(readme|license|licence|notice|citation|changelog)\b")  # files beside a hub dataset's data
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}


def hub_source(spec, split, subset):
    """The files of `split` (and `subset`) of hub:ORG/NAME[@REVISION]: as the dataset card's
    `configs` list them, else by the split's name in the file paths, as the hub's viewer does."""
    repo_id, _, revision = spec.removeprefix("hub:").partition("@")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise GrafitoError(f"--input {spec}: expected hub:ORG/NAME or hub:ORG/NAME@REVISION")
    commit, sizes = hub.dataset_files(repo_id, revision or None, local_hint=LOCAL_HINT)
    configs = None
    if "README.md" in sizes:
        card = hub.download(repo_id, "README.md", repo_type="dataset", revision=commit, local_hint=LOCAL_HINT)
        configs = hub.card_configs(card)
    data_files = [name for name in sorted(sizes) if format_of(name) and not NOT_DATA.match(Path(name).name)
                  and not any(part.startswith((".", "__")) for part in name.split("/"))]
    names = split_files(data_files, configs, split, subset, spec)
    label = f"{spec} ({'subset ' + subset + ', ' if subset else ''}split {split})"
    return HubSource(label, repo_id, revision or None, commit, subset, split, names, [sizes[n] for n in names])


def split_files(data_files, configs, split, subset, spec):
    if configs:
        config = _pick_config(configs, subset, spec)
        data_dir = (config.get("data_dir") or "").strip("/")
        patterns = _split_patterns(config.get("data_files"))
        if patterns is not None:
            if split not in patterns:
                raise GrafitoError(f"{spec}: subset {config['config_name']!r} has no split {split!r}; its splits: "
                                   f"{', '.join(patterns)} (choose one with --split)")
            regexes = [_glob_regex(f"{data_dir}/{p}" if data_dir else p) for p in patterns[split]]
            found = [name for name in data_files if any(r.match(name) for r in regexes)]
        else:
            found = _by_split_name([n for n in data_files if n.startswith(f"{data_dir}/")] if data_dir else data_files,
                                   split)
    else:
        if subset:
            data_files = [name for name in data_files if name.startswith(f"{subset}/")]
            if not data_files:
                raise GrafitoError(f"{spec}: no folder {subset!r} of data files for --subset (the dataset card "
                                   f"defines no subsets)")
        found = _by_split_name(data_files, split)
    if not found:
        raise GrafitoError(f"{spec}: no data files for split {split!r}{' of subset ' + repr(subset) if subset else ''} "
                           f"among {len(data_files)} data files ({', '.join(data_files[:8]) or 'none'}"
                           f"{', ...' if len(data_files) > 8 else ''}); choose another --split")
    return found


def _pick_config(configs, subset, spec):
    names = [c.get("config_name", "default") for c in configs]
    if subset:
        if subset not in names:
            raise GrafitoError(f"{spec}: no subset {subset!r}; its subsets: {', '.join(names)}")
        return {**configs[names.index(subset)], "config_name": subset}
    defaults = [c for c in configs if c.get("default")] or [c for c in configs if c.get("config_name") == "default"]
    if defaults or len(configs) == 1:
        config = (defaults or configs)[0]
        return {**config, "config_name": config.get("config_name", "default")}
    raise GrafitoError(f"{spec} has several subsets and none is the default; choose one with --subset: {', '.join(names)}")


def _split_patterns(data_files):
    """The dataset card's data_files as {split: [glob patterns]}, or None if it gives none."""
    if not data_files:
        return None
    if isinstance(data_files, str):
        return {"train": [data_files]}
    if isinstance(data_files, dict):
        return {split: [p] if isinstance(p, str) else list(p) for split, p in data_files.items()}
    if all(isinstance(item, str) for item in data_files):
        return {"train": list(data_files)}
    patterns = {}
    for item in data_files:
        path = item.get("path", []) if isinstance(item, dict) else []
        patterns.setdefault(item.get("split", "train"), []).extend([path] if isinstance(path, str) else path)
    return patterns


def _glob_regex(pattern):
    """The hub's glob as a regex over a file's path: * stays within a folder, ** crosses them."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _by_split_name(data_files, split):
    """Files whose path names the split as a word (train-00000-of-00002.parquet,
    data/test.jsonl, validation/0.parquet); every file is train if none names any split."""
    def names(word, path):
        return re.search(rf"(?:^|[-._ /\d]){re.escape(word)}(?:$|[-._ /\d])", path.lower())

    words = SPLIT_WORDS.get(split, (split,))
    found = [name for name in data_files if any(names(w, name) for w in words)]
    any_split = [name for name in data_files if any(names(w, name) for ws in SPLIT_WORDS.values() for w in ws)]
    if not found and not any_split and split == "train":
        return list(data_files)
    return found


# ----------------------------------------------------------------------------- files -> rows

def read_rows(source, report, columns=None, progress=True):
    """(where, row) for every row of every file of the source, in order, with a progress bar
    over the bytes read. where is the row's line (one file) or 'name:line' (several); columns
    (a list of names) limits what a Parquet file decodes to what the caller reads."""
    several, sizes = len(source.names) > 1, source.sizes
    with tqdm(total=sum(size or 0 for size in sizes) or None, unit="B", unit_scale=True, desc="reading",
              disable=not progress, mininterval=0.5) as bar:
        for (name, path), size in zip(source.files(), sizes):
            if size is None:  # a hub file whose size the listing left out
                bar.total = (bar.total or 0) + path.stat().st_size
            with closing(read_file(path, _InFile(report, name) if several else report, columns, bar.update)) as rows:
                for line, row in rows:
                    yield (f"{name}:{line}" if several else line), row


class _InFile:
    """The report, for one of several files: its skips are numbered 'name:line'."""

    def __init__(self, report, name):
        self.report, self.name = report, name

    @property
    def read(self):
        return self.report.read

    @read.setter
    def read(self, value):
        self.report.read = value

    def skip(self, reason, line, detail=""):
        self.report.skip(reason, f"{self.name}:{line}", detail)


class _Uncounted:
    """A report that counts nothing: peek() reads rows the real reading counts later."""
    read = 0

    def skip(self, *args, **kwargs):
        pass


def peek(source, n):
    """The first n rows of the source (fewer if it holds fewer), counted nowhere."""
    rows, uncounted = [], _Uncounted()
    for _, path in source.files():
        with closing(read_file(path, uncounted)) as reader:
            for _, row in reader:
                rows.append(row)
                if len(rows) == n:
                    return rows
    if uncounted.read and not rows:
        raise GrafitoError(f"{source.label}: none of its {uncounted.read:,} records can be read (bad JSON, invalid "
                           f"UTF-8 or the wrong number of CSV fields; --strict stops at the first)")
    return rows


def read_file(path, report, columns=None, advance=None):
    """(line, row) for every row of one file, by the reader of its format."""
    fmt = format_of(path)
    if fmt is None:
        raise GrafitoError(f"{path}: unknown format; expected one of {', '.join(FORMATS)}")
    return READERS[fmt](Path(path), report, columns, advance or (lambda n: None))


def _open(path):
    """(raw file, stream to read): the stream decompresses when the file starts as gzip does."""
    raw = open(path, "rb")
    compressed = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    return raw, gzip.GzipFile(fileobj=raw) if compressed else raw


def read_json_lines(path, report, columns=None, advance=lambda n: None):
    """(line, value) per non-blank line; invalid UTF-8 and bad JSON are counted skips."""
    line_no, position = 0, 0
    try:
        raw, stream = _open(path)
        with raw, stream:
            for line_no, line in enumerate(stream, start=1):
                if line_no % 4096 == 0:
                    advance(raw.tell() - position)
                    position = raw.tell()
                if not line.strip():
                    continue
                report.read += 1
                try:
                    value = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    report.skip("invalid_utf8", line_no)
                    continue
                except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep to read
                    report.skip("bad_json", line_no, f"{type(err).__name__}: {err}"[:200])
                    continue
                yield line_no, value
            advance(raw.tell() - position)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise GrafitoError(f"{path}: unreadable, corrupt or truncated after line {line_no} ({type(err).__name__}: "
                           f"{err}); download it again") from None


def read_json(path, report, columns=None, advance=lambda n: None):
    """(line, item) per item of a JSON list; a .json file of JSON lines goes to read_json_lines."""
    if _first_character(path) != "[":
        yield from read_json_lines(path, report, columns, advance)
        return
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    decoder, whitespace = json.JSONDecoder(), re.compile(r"\s*")
    bytes_per_char = path.stat().st_size / max(len(text), 1)
    position, line, counted = whitespace.match(text, start + 1).end(), 1, start
    if text.startswith("]", position):
        return
    while True:
        line += text.count("\n", counted, position)
        counted = position
        try:
            item, end = decoder.raw_decode(text, position)
        except (json.JSONDecodeError, RecursionError) as err:
            raise GrafitoError(f"{path}, line {getattr(err, 'lineno', line)}: not valid JSON ({type(err).__name__}: "
                               f"{err}); a .json file "
                               f"holds one list of records, or one record a line") from None
        report.read += 1
        yield line, item
        advance(int((end - position) * bytes_per_char))
        position = whitespace.match(text, end).end()
        if text.startswith(",", position):
            position = whitespace.match(text, position + 1).end()
        elif text.startswith("]", position) and not text[position + 1:].strip():
            return
        else:
            line += text.count("\n", counted, position)
            raise GrafitoError(f"{path}, line {line}: expected ',' or the list's end after an item; a .json file holds "
                               f"one list of records, or one record a line")


def read_parquet(path, report, columns=None, advance=lambda n: None):
    """(row number, row) per row, a batch of rows decoded at a time."""
    import pyarrow  # only Parquet sources need it
    import pyarrow.parquet

    row = 0
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        names = parquet.schema_arrow.names
        wanted = None if columns is None else [name for name in names if name in columns]
        bytes_per_row = path.stat().st_size / max(parquet.metadata.num_rows, 1)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            for value in batch.to_pylist():
                row += 1
                report.read += 1
                yield row, value
            advance(int(batch.num_rows * bytes_per_row))
    except (pyarrow.ArrowException, OSError) as err:
        raise GrafitoError(f"{path}: not a Parquet file, or damaged after row {row} ({type(err).__name__}: {err})") from None


SURROGATE = re.compile("[\udc80-\udcff]")  # where surrogateescape kept a byte that is not UTF-8


def read_csv(path, report, columns=None, advance=lambda n: None):
    """(line, {header name: value}) per record; every value is a string."""
    csv.field_size_limit(2 ** 31 - 1)  # a long answer is one field
    records = None
    try:
        raw, stream = _open(path)
        with raw, stream, io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
            records = csv.reader(text)
            header = next(records, None)
            if header is None:
                return
            if any(SURROGATE.search(name) for name in header):
                raise GrafitoError(f"{path}: the CSV header is not UTF-8 text")
            previous, position = records.line_num, 0
            for record in records:
                start, previous = previous + 1, records.line_num  # a record may span lines
                if not record:
                    continue
                report.read += 1
                if report.read % 4096 == 0:
                    advance(raw.tell() - position)
                    position = raw.tell()
                if any(SURROGATE.search(value) for value in record):
                    report.skip("invalid_utf8", start)
                elif len(record) != len(header):
                    report.skip("wrong_number_of_fields", start, f"{len(record)} fields, the header names {len(header)}")
                else:
                    yield start, dict(zip(header, record))
            advance(raw.tell() - position)
    except csv.Error as err:
        raise GrafitoError(f"{path}, line {records.line_num if records else 1}: malformed CSV ({err})") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise GrafitoError(f"{path}: unreadable, corrupt or truncated after line {records.line_num if records else 0} "
                           f"({type(err).__name__}: {err}); download it again") from None


def read_text(path, report, columns=None, advance=lambda n: None):
    """The whole file as one row {"text": ...}; a file that is not UTF-8 is a counted skip."""
    report.read += 1
    data = _read_bytes(path)
    advance(path.stat().st_size)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        report.skip("invalid_utf8", 1)
        return
    yield 1, {"text": text}


READERS = {".jsonl": read_json_lines, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv,
           ".txt": read_text}


def _first_character(path):
    """The first character that is not white space (or a byte-order mark), or ''."""
    try:
        raw, stream = _open(path)
        with raw, stream:
            while chunk := stream.read(1 << 16):
                text = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
                if text:
                    return text[:1].decode("latin-1")
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise GrafitoError(f"{path}: unreadable, corrupt or truncated ({type(err).__name__}: {err})") from None
    return ""


def _read_bytes(path):
    try:
        raw, stream = _open(path)
        with raw, stream:
            return stream.read()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise GrafitoError(f"{path}: unreadable, corrupt or truncated ({type(err).__name__}: {err})") from None


def _read_text(path):
    try:
        return _read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise GrafitoError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


# ----------------------------------------------------------------------------- single downloads

def sha256_of(path, advance=lambda n: None):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            advance(len(chunk))
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


def fetch_hub_file(repo_id, filename):
    """One file of a hub dataset, through huggingface_hub's cache."""
    return hub.download(repo_id, filename, repo_type="dataset", local_hint="Pass a local copy of the file with --input PATH.")
