"""The prepared-dataset format: written by prepare/, read by train.py, sample.py, eval.py and bench.py.

A dataset folder (data/<name>/ by default) holds, for each split (train, val):

    <split>.bin          uint16  token ids of all conversations, concatenated; each ends with <|endoftext|>
    <split>.mask.bin     uint8   1 where the token is supervised (answers and their end-of-text), same length
    <split>.offsets.bin  int64   start of every conversation, then the total length (num_conversations + 1)

and meta.json: format version, tokenizer, template, vocab size, source (URL or path, sha256),
counts, block size, seed, split fraction. All three .bin files are raw arrays for np.memmap.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import GrafitoError, atomic_dir, current_version

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DATA_ROOT = Path(__file__).resolve().parent / "data"
TOKEN_DTYPE, MASK_DTYPE, OFFSET_DTYPE = np.uint16, np.uint8, np.int64


def split_files(folder, split):
    folder = Path(folder)
    return folder / f"{split}.bin", folder / f"{split}.mask.bin", folder / f"{split}.offsets.bin"


def check_replaceable(folder):
    """Refuse to write a dataset over anything but a prepared dataset or an empty folder
    (or over `<folder>.old`, which the write would first move back into place)."""
    existing = current_version(folder)
    if existing.exists() and not (existing / "meta.json").is_file() and (not existing.is_dir() or any(existing.iterdir())):
        raise GrafitoError(f"refusing to write a dataset to {folder}: {existing} exists and is not a prepared "
                           f"dataset (no meta.json); choose another --out_dir, or move it away yourself")


def write_dataset(folder, splits, meta):
    """Write {split: [(ids, mask), ...]} and meta.json atomically (all files or none replaced)."""
    folder = Path(folder)
    check_replaceable(folder)
    with atomic_dir(folder) as tmp:
        for split, conversations in splits.items():
            lengths = np.fromiter((len(ids) for ids, _ in conversations), dtype=OFFSET_DTYPE, count=len(conversations))
            offsets = np.zeros(len(conversations) + 1, dtype=OFFSET_DTYPE)
            np.cumsum(lengths, out=offsets[1:])
            tokens = np.fromiter((t for ids, _ in conversations for t in ids), dtype=np.int64, count=int(offsets[-1]))
            mask = np.fromiter((m for _, mask in conversations for m in mask), dtype=MASK_DTYPE, count=int(offsets[-1]))
            if len(tokens) and tokens.max() >= np.iinfo(TOKEN_DTYPE).max:
                raise GrafitoError(f"token id {int(tokens.max())} does not fit the uint16 format (ids must be < 65535)")
            token_file, mask_file, offset_file = split_files(tmp, split)
            tokens.astype(TOKEN_DTYPE).tofile(token_file)
            mask.tofile(mask_file)
            offsets.tofile(offset_file)
        full_meta = {"format_version": FORMAT_VERSION, **meta,
                     "splits": {s: {"conversations": len(c), "tokens": sum(len(ids) for ids, _ in c),
                                    "supervised_tokens": sum(sum(m) for _, m in c)} for s, c in splits.items()}}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2) + "\n")
    return full_meta


def resolve_dataset(name_or_path):
    """A dataset is a folder name under data/ or a path to a prepared folder."""
    path = Path(name_or_path).expanduser()
    candidates = [path] if path.is_absolute() or path.exists() else [DATA_ROOT / name_or_path, path]
    for folder in map(current_version, candidates):
        if (folder / "meta.json").is_file():
            return folder
    raise GrafitoError(f"dataset {name_or_path!r} not found: expected meta.json in {candidates[0]}; "
                       f"run a prepare script first, e.g. python prepare/grafito25k.py")


def load_meta(folder):
    return _read_meta(resolve_dataset(folder))


def _read_meta(folder):
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise GrafitoError(f"{folder / 'meta.json'} is unreadable ({type(err).__name__}: {err}); rerun the prepare script") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise GrafitoError(f"{folder}: not a dataset this grafito reads (format version {version}, expected "
                           f"{FORMAT_VERSION}); rerun its prepare script")
    splits = meta.get("splits")
    well_formed = isinstance(splits, dict) and all(
        isinstance(counts, dict) and all(type(counts.get(k)) is int and counts[k] >= 0 for k in ("conversations", "tokens"))
        for counts in splits.values())
    if not well_formed or type(meta.get("vocab_size", 0)) is not int:
        raise GrafitoError(f"{folder / 'meta.json'} is damaged ('splits' needs conversations and tokens counts per split, "
                           f"vocab_size an integer); rerun the prepare script")
    return meta


@dataclass
class Split:
    """One split, memory-mapped: tokens and mask (uint16/uint8 arrays) and conversation offsets."""
    name: str
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    @property
    def num_conversations(self):
        return len(self.offsets) - 1

    @property
    def lengths(self):
        return np.diff(self.offsets)

    def conversation(self, i):
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[start:end].tolist(), self.mask[start:end].tolist()


def load_split(folder, split):
    folder = resolve_dataset(folder)
    meta = _read_meta(folder)
    token_file, mask_file, offset_file = split_files(folder, split)
    if split not in meta["splits"] or not token_file.exists():
        raise GrafitoError(f"{folder} has no {split!r} split (it has {', '.join(meta['splits'])})")
    n_tokens = meta["splits"][split]["tokens"]
    if n_tokens == 0:
        empty = np.zeros(0, dtype=TOKEN_DTYPE)
        return Split(split, empty, empty.astype(MASK_DTYPE), np.zeros(1, dtype=OFFSET_DTYPE))
    sizes = [f.stat().st_size if f.is_file() else 0 for f in (token_file, mask_file)]
    offsets = np.fromfile(offset_file, dtype=OFFSET_DTYPE) if offset_file.is_file() else np.zeros(0, OFFSET_DTYPE)
    offsets_end = int(offsets[-1]) if len(offsets) else None
    expected = [n_tokens * np.dtype(TOKEN_DTYPE).itemsize, n_tokens * np.dtype(MASK_DTYPE).itemsize]
    n_conversations = meta["splits"][split].get("conversations", len(offsets) - 1)
    if (len(offsets) != n_conversations + 1 or len(offsets) == 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any()
            or offset_file.stat().st_size != len(offsets) * np.dtype(OFFSET_DTYPE).itemsize):
        raise GrafitoError(f"{folder}: {offset_file.name} is damaged (expected {n_conversations + 1} increasing offsets "
                           f"from 0); rerun the prepare script")
    if sizes != expected or offsets_end != n_tokens:
        raise GrafitoError(f"{folder}: {split} files disagree with meta.json ({sizes[0]} token bytes, "
                           f"{sizes[1]} mask bytes, offsets end at {offsets_end}, meta says {n_tokens} tokens); "
                           f"rerun the prepare script")
    tokens = np.memmap(token_file, dtype=TOKEN_DTYPE, mode="r")
    mask = np.memmap(mask_file, dtype=MASK_DTYPE, mode="r")
    ends = offsets[1:] - 1
    eot = meta.get("eot_token", 50256)
    if (ends >= 0).all() and ((tokens[ends] != eot).any() or mask.max() > 1):
        raise GrafitoError(f"{folder}: {split} files are damaged (a conversation does not end with end-of-text where "
                           f"{offset_file.name} says, or {mask_file.name} holds values other than 0 and 1); rerun "
                           f"the prepare script")
    return Split(split, tokens, mask, offsets)


def check_token_ids(split, vocab_size):
    """Every token id of a split is a row of the model's embedding (checked once, at load)."""
    if len(split.tokens) and int(split.tokens.max()) >= vocab_size:
        raise GrafitoError(f"the {split.name} split holds token id {int(split.tokens.max())}, but the model has only "
                           f"{vocab_size} token embeddings; was it prepared with another tokenizer?")


# ----------------------------------------------------------------------------- batches for training

def pack_rows(lengths, capacity, order, open_rows=8):
    """Group conversations (in `order`) into rows of at most `capacity` tokens.

    First fit over a few open rows: a conversation goes into the first open row it fits,
    else opens a new one; when too many rows are open the oldest is closed. No conversation
    is split, except one longer than a row, which is cut at the row end.
    Returns a list of rows, each a list of conversation indices.
    """
    rows, open_list = [], []  # open_list: [free tokens, [indices]]
    for i in order:
        need = min(int(lengths[i]), capacity)
        for slot in open_list:
            if slot[0] >= need:
                slot[0] -= need
                slot[1].append(int(i))
                break
        else:
            open_list.append([capacity - need, [int(i)]])
            if len(open_list) > open_rows:
                rows.append(open_list.pop(0)[1])
        if open_list and any(free == 0 for free, _ in open_list):
            rows.extend(members for free, members in open_list if free == 0)
            open_list = [slot for slot in open_list if slot[0] > 0]
    rows.extend(slot[1] for slot in open_list)
    return rows


class PackedBatches:
    """Training rows of block_size + 1 tokens packed from whole conversations.

    Each epoch visits every conversation once, in a seeded random order (shuffle=True) or
    in file order. Input x is a row's first block_size tokens, target y the next token at
    each position, -1 where that token is unsupervised or padding. The position (epoch,
    cursor) is all the state; restoring it resumes the exact sequence of batches.
    """

    def __init__(self, split, block_size, seed=0, shuffle=True, pad_id=50256):
        if split.num_conversations == 0:
            raise GrafitoError(f"the {split.name} split has no conversations")
        self.split, self.block_size, self.seed, self.shuffle, self.pad_id = split, block_size, seed, shuffle, pad_id
        self.lengths = split.lengths
        self.epoch, self.cursor = 0, 0
        self._rows_epoch, self._rows = None, None

    def rows_of_epoch(self, epoch):
        if self._rows_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            else:
                order = np.arange(len(self.lengths))
            self._rows, self._rows_epoch = pack_rows(self.lengths, self.block_size + 1, order), epoch
        return self._rows

    def packing_efficiency(self):
        """Share of row positions holding real tokens in epoch 0."""
        rows = self.rows_of_epoch(0)
        return float(np.minimum(self.lengths, self.block_size + 1).sum()) / (len(rows) * (self.block_size + 1))

    def overlong(self):
        """(conversations longer than a row, their tokens past the row end): what packing cuts off."""
        excess = np.maximum(self.lengths.astype(np.int64) - (self.block_size + 1), 0)
        return int((excess > 0).sum()), int(excess.sum())

    def next_rows(self, n):
        """The next n rows, continuing into the next epoch when this one runs out."""
        out = []
        while len(out) < n:
            rows = self.rows_of_epoch(self.epoch)
            take = rows[self.cursor:self.cursor + n - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= len(rows):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def batch(self, rows):
        """(x, y) int64 arrays (len(rows), block_size)."""
        width = self.block_size + 1
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        supervised = np.zeros((len(rows), width), dtype=bool)
        offsets = self.split.offsets
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                start = int(offsets[i])
                n = min(int(offsets[i + 1]) - start, width - at)
                tokens[r, at:at + n] = self.split.tokens[start:start + n]
                supervised[r, at:at + n] = self.split.mask[start:start + n]
                at += n
        x = tokens[:, :-1]
        y = np.where(supervised[:, 1:], tokens[:, 1:], -1)
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_batches(split, block_size, batch_size, max_batches=0):
    """All of a split in file order, packed into (x, y) batches; the first max_batches if > 0."""
    packed = PackedBatches(split, block_size, shuffle=False)
    rows = packed.rows_of_epoch(0)
    batches = [packed.batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches[:max_batches] if max_batches else batches
