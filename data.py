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

from common import GrafitoError, atomic_dir, recover_dir

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DATA_ROOT = Path(__file__).resolve().parent / "data"
TOKEN_DTYPE, MASK_DTYPE, OFFSET_DTYPE = np.uint16, np.uint8, np.int64


def split_files(folder, split):
    folder = Path(folder)
    return folder / f"{split}.bin", folder / f"{split}.mask.bin", folder / f"{split}.offsets.bin"


def write_dataset(folder, splits, meta):
    """Write {split: [(ids, mask), ...]} and meta.json atomically (all files or none replaced)."""
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
    for folder in candidates:
        recover_dir(folder)
        if (folder / "meta.json").is_file():
            return folder
    raise GrafitoError(f"dataset {name_or_path!r} not found: expected meta.json in {candidates[0]}; "
                       f"run a prepare script first, e.g. python prepare/grafito25k.py")


def load_meta(folder):
    folder = resolve_dataset(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise GrafitoError(f"{folder}: data format version {meta.get('format_version')}, this grafito reads "
                           f"{FORMAT_VERSION}; rerun its prepare script")
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
    meta = load_meta(folder)
    token_file, mask_file, offset_file = split_files(folder, split)
    if split not in meta["splits"] or not token_file.exists():
        raise GrafitoError(f"{folder} has no {split!r} split (it has {', '.join(meta['splits'])})")
    n_tokens = meta["splits"][split]["tokens"]
    if n_tokens == 0:
        empty = np.zeros(0, dtype=TOKEN_DTYPE)
        return Split(split, empty, empty.astype(MASK_DTYPE), np.zeros(1, dtype=OFFSET_DTYPE))
    tokens = np.memmap(token_file, dtype=TOKEN_DTYPE, mode="r")
    mask = np.memmap(mask_file, dtype=MASK_DTYPE, mode="r")
    offsets = np.fromfile(offset_file, dtype=OFFSET_DTYPE)
    if len(tokens) != n_tokens or len(mask) != n_tokens or offsets[-1] != n_tokens:
        raise GrafitoError(f"{folder}: {split} files disagree with meta.json ({len(tokens)} tokens, "
                           f"{len(mask)} mask bytes, offsets end at {offsets[-1]}, meta says {n_tokens}); "
                           f"rerun the prepare script")
    return Split(split, tokens, mask, offsets)
