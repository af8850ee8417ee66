"""The prepared-dataset format: written by prepare/, read by train.py, sample.py, eval.py and bench.py.

A dataset folder (data/<name>/ by default) holds, for each split (train, val):

    <split>.bin          uint16  token ids of all conversations, concatenated; each ends with <|endoftext|>
    <split>.mask.bin     uint8   1 where the token is supervised (answers and their end-of-text), same length
    <split>.offsets.bin  int64   start of every conversation, then the total length (num_conversations + 1)

and meta.json: format version, tokenizer, template, vocab size, source (URL or path, sha256),
counts, block size, seed, split fraction. All three .bin files are raw arrays for np.memmap.

A preference-pairs dataset (meta.json "kind": "pairs", from prepare/hh_rlhf.py --pairs) has
the same files: pair i of a split is conversation 2i (prompt + chosen answer) and 2i+1
(prompt + rejected answer). Both rows start with the same prompt ids, every earlier turn
with its answer and the last instruction up to '### Answer:'; the mask is 1 only on the
final answer and its <|endoftext|>. A meta.json without "kind" is an SFT dataset.

A text dataset (meta.json "kind": "text", from prepare/text.py) holds plain documents for
next-token training (objective=lm), every token a target, in shards so that billions of
tokens never make one file:

    <split>-00000.bin, <split>-00001.bin, ...   uint16  whole documents, each followed by <|endoftext|>

meta.json's "splits" list each split's shards ({"file", "documents", "tokens",
"max_token_id"}) with the split's totals. Training reads random windows of them (TextWindows).
"""

import contextlib
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
    with dataset_writer(folder, meta, splits=tuple(splits)) as writer:
        for split, conversations in splits.items():
            for ids, mask in conversations:
                writer.add(split, ids, mask)
    return writer.meta


@contextlib.contextmanager
def dataset_writer(folder, meta, kind="sft", splits=SPLITS):
    """A DatasetWriter that builds the dataset in a temporary folder beside `folder`.

    On a clean exit it writes meta.json (meta, the kind's keys and the counts; also left as
    writer.meta) and swaps the folder into place; an error inside the block, or a token id
    that does not fit uint16, leaves the old dataset as it was. kind is "sft" (meta.json
    without "kind") or "pairs" (rows written in pairs, see pair_rows).
    """
    folder = Path(folder)
    check_replaceable(folder)
    kind_meta = {"sft": {}, "pairs": {"kind": "pairs", "layout": PAIRS_LAYOUT}}[kind]
    with atomic_dir(folder) as tmp:
        writer = DatasetWriter(tmp, splits)
        try:
            yield writer
            writer.flush()
        finally:
            writer.close()
        writer.meta = {"format_version": FORMAT_VERSION, **meta, **kind_meta, "splits": writer.counts}
        (tmp / "meta.json").write_text(json.dumps(writer.meta, indent=2) + "\n")


class DatasetWriter:
    """Appends conversations to the three files of each split, a buffer of tokens at a time,
    so a dataset of any size is written in bounded memory. Use it through dataset_writer()."""

    BUFFER_TOKENS = 1 << 20

    def __init__(self, folder, splits):
        self.files = {s: [open(path, "wb") for path in split_files(folder, s)] for s in splits}
        self.counts = {s: {"conversations": 0, "tokens": 0, "supervised_tokens": 0} for s in splits}
        self.buffers = {s: ([], [], []) for s in splits}  # token ids, mask, conversation ends
        self.meta = None
        for token_file, mask_file, offset_file in self.files.values():
            np.zeros(1, dtype=OFFSET_DTYPE).tofile(offset_file)

    def add(self, split, ids, mask):
        """One conversation: its token ids and loss mask (equal lengths)."""
        if len(ids) != len(mask):
            raise ValueError(f"{len(ids)} token ids but {len(mask)} mask values")
        tokens, masks, ends = self.buffers[split]
        counts = self.counts[split]
        tokens.extend(ids)
        masks.extend(mask)
        counts["conversations"] += 1
        counts["tokens"] += len(ids)
        counts["supervised_tokens"] += sum(mask)
        ends.append(counts["tokens"])
        if len(tokens) >= self.BUFFER_TOKENS:
            self._flush_split(split)

    def flush(self):
        for split in self.buffers:
            self._flush_split(split)

    def _flush_split(self, split):
        tokens, masks, ends = self.buffers[split]
        ids = np.array(tokens, dtype=np.int64)
        if len(ids) and ids.max() >= np.iinfo(TOKEN_DTYPE).max:
            raise GrafitoError(f"token id {int(ids.max())} does not fit the uint16 format (ids must be < 65535)")
        token_file, mask_file, offset_file = self.files[split]
        ids.astype(TOKEN_DTYPE).tofile(token_file)
        np.array(masks, dtype=MASK_DTYPE).tofile(mask_file)
        np.array(ends, dtype=OFFSET_DTYPE).tofile(offset_file)
        for buffer in self.buffers[split]:
            buffer.clear()

    def close(self):
        for files in self.files.values():
            for f in files:
                f.close()


def resolve_dataset(name_or_path):
    """A dataset is a folder name under data/ or a path to a prepared folder."""
    path = Path(name_or_path).expanduser()
    candidates = [path] if path.is_absolute() or path.exists() else [DATA_ROOT / name_or_path, path]
    for folder in map(current_version, candidates):
        if (folder / "meta.json").is_file():
            return folder
    raise GrafitoError(f"dataset {name_or_path!r} not found: expected meta.json in {candidates[0]}; "
                       f"run a prepare script first, e.g. python prepare/grafito25k.py")


def short_name(name_or_path):
    """How logs and tables name a dataset: its folder's name."""
    return Path(str(name_or_path).rstrip("/")).name or str(name_or_path)


def load_meta(folder):
    return _read_meta(resolve_dataset(folder))


KINDS = ("sft", "pairs", "text")


def dataset_kind(meta):
    """'sft' (conversations; meta.json without "kind"), 'pairs' (preference pairs, see load_pairs)
    or 'text' (documents, see load_text)."""
    return meta.get("kind", "sft")


def check_kind(meta, expected, folder="the dataset"):
    """Refuse a dataset of the wrong kind: SFT on a pairs dataset would also learn the rejected answers."""
    kind = dataset_kind(meta)
    if kind == expected:
        return
    if kind not in KINDS:
        raise GrafitoError(f"{folder}: dataset kind {kind!r} is not one this grafito reads ({', '.join(KINDS)})")
    if "text" in (kind, expected):
        raise GrafitoError(f"{folder} is a {kind} dataset; " + (
            "a text dataset trains with objective=lm (next-token on every token)" if kind == "text" else
            "objective=lm trains on text datasets (python prepare/text.py --input=...)"))
    if kind == "pairs":
        raise GrafitoError(f"{folder} is a preference-pairs dataset (prepared with --pairs): read as conversations "
                           f"it would train on its rejected answers too; use it with a preference objective, or "
                           f"prepare an SFT dataset without --pairs")
    raise GrafitoError(f"{folder} is an SFT dataset of conversations, not preference pairs; prepare pairs with "
                       f"--pairs, e.g. python prepare/hh_rlhf.py --pairs")


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
    counts = ("documents", "tokens") if isinstance(meta, dict) and meta.get("kind") == "text" else ("conversations", "tokens")

    def counted(entry, keys):
        return isinstance(entry, dict) and all(type(entry.get(k)) is int and entry[k] >= 0 for k in keys)

    well_formed = isinstance(splits, dict) and all(counted(split, counts) for split in splits.values())
    if well_formed and meta.get("kind") == "text":
        well_formed = all(isinstance(split.get("shards"), list) and all(
            counted(shard, ("documents", "tokens", "max_token_id")) and isinstance(shard.get("file"), str)
            and Path(shard["file"]).name == shard["file"] for shard in split["shards"]) for split in splits.values())
    if not well_formed or type(meta.get("vocab_size", 0)) is not int:
        raise GrafitoError(f"{folder / 'meta.json'} is damaged ('splits' needs {' and '.join(counts)} counts per split"
                           f"{' and its shards' if counts[0] == 'documents' else ''}, vocab_size an integer); rerun "
                           f"the prepare script")
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


def load_split(folder, split, kind="sft"):
    """One split's files, checked against meta.json; a dataset of another kind is refused."""
    folder = resolve_dataset(folder)
    meta = _read_meta(folder)
    check_kind(meta, kind, folder)
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
        return inputs_and_targets(tokens, supervised)

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    rows_per_item = 1  # rows of a batch one item fills (Mixture assembles batches by it)
    next_items = next_rows


def inputs_and_targets(tokens, supervised):
    """(x, y) from rows of tokens: x all but the last token, y the next token where it is supervised, else -1."""
    return tokens[:, :-1], np.where(supervised[:, 1:], tokens[:, 1:], -1)


def eval_batches(split, block_size, batch_size, max_batches=0):
    """All of a split in file order, packed into (x, y) batches; the first max_batches if > 0."""
    packed = PackedBatches(split, block_size, shuffle=False)
    rows = packed.rows_of_epoch(0)
    batches = [packed.batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches[:max_batches] if max_batches else batches


# ----------------------------------------------------------------------------- preference pairs

EOT = 50256  # <|endoftext|> (tokenizer.EOT): every row of a pairs dataset ends with it
PAIRS_LAYOUT = ("pair i = conversations 2i (prompt + chosen answer) and 2i+1 (prompt + rejected answer), "
                "the same prompt ids in both; mask 1 on the final answer and its end-of-text only")


def write_pairs(folder, splits, meta):
    """Write {split: [(prompt ids, chosen answer ids, rejected answer ids), ...]} as a pairs dataset."""
    with dataset_writer(folder, meta, kind="pairs", splits=tuple(splits)) as writer:
        for split, pairs in splits.items():
            for prompt, chosen, rejected in pairs:
                for ids, mask in pair_rows(prompt, chosen, rejected):
                    writer.add(split, ids, mask)
    return writer.meta


def pair_rows(prompt, chosen, rejected):
    """The two rows of a pair, [(ids, mask), (ids, mask)]: prompt + chosen answer, then prompt
    + rejected answer, the mask 1 on the answer only. Both answers end with <|endoftext|>;
    both rows are built from the one prompt list, so they share its ids by construction."""
    if not prompt or not chosen or not rejected or chosen[-1] != EOT or rejected[-1] != EOT:
        raise GrafitoError("a pair needs a prompt and two answers that end with <|endoftext|>")
    return [(list(prompt) + list(answer), [0] * len(prompt) + [1] * len(answer)) for answer in (chosen, rejected)]


@dataclass
class PairSplit:
    """One split of a pairs dataset: pair i is rows 2i (prompt + chosen answer) and 2i+1
    (prompt + rejected answer) of `rows`, which share their first prompt_lengths[i] ids."""
    rows: Split
    prompt_lengths: np.ndarray  # int64 (num_pairs,): tokens of the shared prompt, up to '### Answer:'
    answer_lengths: np.ndarray  # int64 (num_pairs, 2): tokens of the chosen and the rejected answer, end-of-text included

    @property
    def name(self):
        return self.rows.name

    @property
    def num_pairs(self):
        return len(self.prompt_lengths)

    @property
    def row_lengths(self):
        """int64 (num_pairs, 2): tokens of the chosen and the rejected row."""
        return self.prompt_lengths[:, None] + self.answer_lengths

    def pair(self, i):
        """(chosen ids, chosen mask, rejected ids, rejected mask) of pair i, as lists."""
        return (*self.rows.conversation(2 * i), *self.rows.conversation(2 * i + 1))


def load_pairs(folder, split):
    """A split of a pairs dataset, memory-mapped; refuses an SFT dataset and rows that are not
    prompt + answer + end-of-text with the same prompt length as their partner."""
    rows = load_split(folder, split, kind="pairs")
    if rows.num_conversations == 0:
        return PairSplit(rows, np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
    where = f"{resolve_dataset(folder)}: the {split} split"
    starts, lengths = rows.offsets[:-1], rows.lengths
    if rows.num_conversations % 2 or (lengths < 2).any():
        raise GrafitoError(f"{where} does not hold pairs of rows (an odd count or an empty row); rerun "
                           f"python prepare/hh_rlhf.py --pairs")
    mask = np.asarray(rows.mask)
    ends = starts + lengths - 1
    # a row's mask is 0 on its prompt, then 1 to its end: it falls back to 0 only where a row starts
    falls = np.flatnonzero(np.diff(mask.astype(np.int8)) < 0) + 1
    answer = np.add.reduceat(mask, starts, dtype=np.int64)
    prompt = (lengths - answer).reshape(-1, 2)
    broken = ((mask > 1).any() or (mask[starts] != 0).any() or (mask[ends] != 1).any()
              or (np.asarray(rows.tokens[ends]) != EOT).any() or not np.isin(falls, starts).all()
              or (prompt[:, 0] != prompt[:, 1]).any())
    if broken:
        raise GrafitoError(f"{where} is damaged: its rows are not prompt (mask 0) + answer and <|endoftext|> "
                           f"(mask 1) with the same prompt length in both rows of a pair; rerun "
                           f"python prepare/hh_rlhf.py --pairs")
    return PairSplit(rows, prompt[:, 0].copy(), answer.reshape(-1, 2))


class PairBatches:
    """Batches of whole preference pairs: two rows per pair, its chosen and its rejected
    conversation, never packed with other text (a row's log-probabilities depend on it alone).

    batch(pairs) gives (x, y), int64 (2 * len(pairs), T): rows 0..B-1 are the chosen rows and
    rows B..2B-1 the rejected rows of the same pairs, in the same order (chosen = rows[:B],
    rejected = rows[B:]). x is a row's tokens but the last; y[t] is the token at t + 1 where that
    token is supervised (the final answer and its end-of-text), else -1. Rows are right-padded,
    x with pad_id and y with -1, to the batch's longest row rounded up to a multiple of
    pad_multiple (at most block_size): padding after a row cannot change its causal
    log-probabilities, short batches stay short, and a compiled model sees at most
    block_size / pad_multiple shapes.

    Each epoch visits every pair once, in a seeded random order (shuffle=True) or in file
    order. With length_group > 0 that order is cut into groups of length_group pairs, each
    sorted longest first, so the pairs that follow each other (a batch) have similar lengths
    and less padding. The position (epoch, cursor) is all the state; restoring it resumes
    the exact sequence of pairs.
    """

    def __init__(self, split, block_size, seed=0, shuffle=True, pad_id=EOT, pad_multiple=64, length_group=0):
        if split.num_pairs == 0:
            raise GrafitoError(f"the {split.name} split has no pairs")
        if pad_multiple < 1 or length_group < 0:
            raise GrafitoError(f"pad_multiple must be at least 1 and length_group at least 0, got {pad_multiple} "
                               f"and {length_group}")
        overlong = int((split.row_lengths.max(axis=1) > block_size + 1).sum())
        if overlong:  # cutting a row would cut its answer, and the answer's log-probability with it
            raise GrafitoError(f"{overlong:,} of {split.num_pairs:,} pairs in the {split.name} split have a row of more "
                               f"than block_size + 1 = {block_size + 1} tokens; prepare the pairs with --block_size "
                               f"{block_size} (it cuts the oldest turns of a prompt) or raise block_size")
        self.split, self.block_size, self.seed, self.shuffle = split, block_size, seed, shuffle
        self.pad_id, self.pad_multiple, self.length_group = pad_id, pad_multiple, length_group
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = None, None

    def order_of_epoch(self, epoch):
        """The pair indices of an epoch, in the order they are visited."""
        if self._order_epoch != epoch:
            n = self.split.num_pairs
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if self.length_group:
                longest = self.split.row_lengths.max(axis=1)
                groups = [order[i:i + self.length_group] for i in range(0, n, self.length_group)]
                order = np.concatenate([group[np.argsort(-longest[group], kind="stable")] for group in groups])
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_pairs(self, n):
        """The next n pair indices, continuing into the next epoch when this one runs out."""
        out = []
        while len(out) < n:
            order = self.order_of_epoch(self.epoch)
            take = order[self.cursor:self.cursor + n - len(out)]
            out += take.tolist()
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def batch(self, pairs):
        """(x, y) int64 arrays (2 * len(pairs), T): the chosen rows, then the rejected rows."""
        pairs = np.asarray(pairs, dtype=np.int64)
        rows = np.concatenate([2 * pairs, 2 * pairs + 1])
        offsets = self.split.rows.offsets
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        longest_input = int(lengths.max()) - 1  # the last token is only a target
        width = min(self.block_size, -(-longest_input // self.pad_multiple) * self.pad_multiple) + 1
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        supervised = np.zeros((len(rows), width), dtype=bool)
        for r, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            tokens[r, :n] = self.split.rows.tokens[start:start + n]
            supervised[r, :n] = self.split.rows.mask[start:start + n]
        return inputs_and_targets(tokens, supervised)

    state_dict, load_state_dict = PackedBatches.state_dict, PackedBatches.load_state_dict  # the same (epoch, cursor)
    rows_per_item = 2  # the chosen rows of a batch, then its rejected rows
    next_items = next_pairs


def pair_eval_batches(split, block_size, batch_size, max_batches=0, pad_multiple=64):
    """All pairs of a split in file order as (pairs, x, y): pairs the int64 indices of the
    batch's batch_size pairs (the last batch may hold fewer), x and y as PairBatches.batch
    gives them; the first max_batches if > 0."""
    batcher = PairBatches(split, block_size, shuffle=False, pad_multiple=pad_multiple)
    starts = range(0, split.num_pairs, batch_size)
    if max_batches:
        starts = starts[:max_batches]
    batches = []
    for start in starts:
        pairs = np.arange(start, min(start + batch_size, split.num_pairs))
        batches.append((pairs, *batcher.batch(pairs)))
    return batches


# ----------------------------------------------------------------------------- text (documents, for objective=lm)

def shard_file(split, index):
    return f"{split}-{index:05d}.bin"


def write_text_dataset(folder, splits, meta):
    """Write {split: [shard, ...]} (each shard a list of documents' token lists, each document
    ending with <|endoftext|>) and meta.json atomically. prepare/text.py streams its shards
    itself (text_shard_entry, text_meta); this writes small datasets in one go."""
    folder = Path(folder)
    check_replaceable(folder)
    with atomic_dir(folder) as tmp:
        entries = {}
        for split, shards in splits.items():
            entries[split] = []
            for index, documents in enumerate(shards):
                tokens = np.fromiter((t for doc in documents for t in doc), dtype=np.int64)
                entries[split].append(write_text_shard(tmp, split, index, tokens, len(documents)))
        (tmp / "meta.json").write_text(json.dumps(text_meta(meta, entries), indent=2) + "\n")


def write_text_shard(folder, split, index, tokens, documents):
    """One shard file from an int array of token ids; returns its meta.json entry."""
    tokens = np.asarray(tokens)
    if len(tokens) and (tokens.max() >= np.iinfo(TOKEN_DTYPE).max or tokens.min() < 0):
        raise GrafitoError(f"token id {int(tokens.max())} does not fit the uint16 format (ids must be < 65535)")
    name = shard_file(split, index)
    tokens.astype(TOKEN_DTYPE).tofile(Path(folder) / name)
    return {"file": name, "documents": int(documents), "tokens": len(tokens),
            "max_token_id": int(tokens.max()) if len(tokens) else 0}


def text_meta(meta, shards):
    """meta.json of a text dataset: meta, and per split its shards (write_text_shard's entries) and totals."""
    return {"format_version": FORMAT_VERSION, **meta, "kind": "text", "eot_token": EOT,
            "splits": {split: {"documents": sum(e["documents"] for e in entries),
                               "tokens": sum(e["tokens"] for e in entries), "shards": entries}
                       for split, entries in shards.items()}}


@dataclass
class TextSplit:
    """One split of a text dataset: its shards, memory-mapped, and its largest token id."""
    name: str
    shards: list  # np.memmap uint16, one per shard file
    documents: int
    max_token_id: int

    @property
    def num_tokens(self):
        return sum(len(shard) for shard in self.shards)


def load_text(folder, split):
    """One split of a text dataset, its shards memory-mapped (read lazily, whatever their size),
    checked against meta.json; a dataset of another kind is refused."""
    folder = resolve_dataset(folder)
    meta = _read_meta(folder)
    check_kind(meta, "text", folder)
    if split not in meta["splits"]:
        raise GrafitoError(f"{folder} has no {split!r} split (it has {', '.join(meta['splits'])})")
    shards = []
    for entry in meta["splits"][split]["shards"]:
        path = folder / entry["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
            raise GrafitoError(f"{folder}: {entry['file']} " + ("is missing" if size is None else f"holds {size:,} bytes, "
                               f"meta.json says {entry['tokens']:,} tokens") + "; rerun python prepare/text.py")
        if entry["tokens"]:
            shards.append(np.memmap(path, dtype=TOKEN_DTYPE, mode="r"))
    return TextSplit(split, shards, meta["splits"][split]["documents"],
                     max((e["max_token_id"] for e in meta["splits"][split]["shards"]), default=0))


class TextWindows:
    """Training windows: block_size + 1 consecutive tokens at a random place of a text split
    (any start in any shard, each equally likely), x the first block_size, y the next token at
    each position. A window may cross a document boundary, as in GPT-2's own training.

    The windows of a call are drawn from a generator seeded with (seed, windows drawn so far):
    that count is all the state, and restoring it resumes the exact sequence."""

    def __init__(self, split, block_size, seed=0):
        starts = np.array([max(len(shard) - block_size, 0) for shard in split.shards], dtype=np.int64)
        if not starts.sum():
            raise GrafitoError(f"the {split.name} split has no shard of more than block_size = {block_size} tokens "
                               f"({split.num_tokens:,} tokens in all); prepare more text or lower block_size")
        self.split, self.block_size, self.seed, self.starts = split, block_size, seed, starts
        self.ends = np.cumsum(starts)
        self.drawn = 0

    def next_windows(self, n):
        """The next n windows as (shard, offset) pairs."""
        picks = np.random.default_rng([self.seed, self.drawn]).integers(0, int(self.ends[-1]), size=n)
        self.drawn += n
        shards = np.searchsorted(self.ends, picks, side="right")
        return list(zip(shards.tolist(), (picks - (self.ends[shards] - self.starts[shards])).tolist()))

    def batch(self, windows):
        return text_batch(self.split, windows, self.block_size)

    def state_dict(self):
        return {"drawn": self.drawn}

    def load_state_dict(self, state):
        self.drawn = int(state["drawn"])

    rows_per_item = 1
    next_items = next_windows


class TextEvalBatches:
    """A text split's consecutive, non-overlapping windows, in file order, as (x, y) batches of
    batch_size rows (the first max_batches if > 0); read from the shards as they are iterated,
    so a large val split is never held in memory."""

    def __init__(self, split, block_size, batch_size, max_batches=0):
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.windows = [(s, o) for s, shard in enumerate(split.shards)
                        for o in range(0, len(shard) - block_size, block_size)]
        if max_batches:
            self.windows = self.windows[:max_batches * batch_size]

    def __len__(self):
        return -(-len(self.windows) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.windows), self.batch_size):
            yield text_batch(self.split, self.windows[start:start + self.batch_size], self.block_size)


def text_batch(split, windows, block_size):
    """(x, y) int64 arrays (len(windows), block_size) from (shard, offset) windows of block_size + 1 tokens."""
    rows = np.stack([split.shards[shard][offset:offset + block_size + 1] for shard, offset in windows]).astype(np.int64)
    return rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------- mixtures of datasets

class Mixture:
    """Training items from several datasets of one kind, in proportion to weights.

    Item k of the run comes from dataset i with probability weights[i] (they sum to 1), drawn
    by a generator seeded with (seed, items drawn so far); that dataset's own sampler (PackedBatches,
    PairBatches or TextWindows) gives the item, so each dataset keeps its own position and
    counts its own epochs. Items are (dataset index, that dataset's item). batch() asks each
    sampler for its items' rows and puts them back in item order (for pairs: every chosen row,
    then every rejected row), right-padded to the widest: x with pad_id, y with -1, which
    changes no row's causal loss. The drawn count and every sampler's position are the state."""

    def __init__(self, samplers, weights, seed=0, pad_id=EOT):
        if len(samplers) != len(weights) or not samplers or any(w <= 0 for w in weights):
            raise GrafitoError(f"a mixture needs one positive weight per dataset, got {list(weights)} for "
                               f"{len(samplers)} dataset(s)")
        self.samplers, self.seed, self.pad_id = samplers, seed, pad_id
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.rows_per_item = samplers[0].rows_per_item
        self.drawn = 0

    def next_items(self, n):
        picks = np.random.default_rng([self.seed, self.drawn]).choice(len(self.samplers), size=n, p=self.weights)
        self.drawn += n
        taken = {int(i): iter(self.samplers[i].next_items(int((picks == i).sum()))) for i in np.unique(picks)}
        return [(int(i), next(taken[int(i)])) for i in picks]

    def batch(self, items):
        parts = {}  # dataset -> (positions of its items, x, y)
        for i in sorted({d for d, _ in items}):
            where = [k for k, (d, _) in enumerate(items) if d == i]
            parts[i] = (where, *self.samplers[i].batch([items[k][1] for k in where]))
        width, n, per = max(x.shape[1] for _, x, _ in parts.values()), len(items), self.rows_per_item
        x = np.full((per * n, width), self.pad_id, dtype=np.int64)
        y = np.full((per * n, width), -1, dtype=np.int64)
        for where, part_x, part_y in parts.values():
            for r in range(per):  # the part's r-th block of rows goes to the r-th block of the batch
                rows = np.asarray(where) + r * n
                x[rows, :part_x.shape[1]] = part_x[r * len(where):(r + 1) * len(where)]
                y[rows, :part_y.shape[1]] = part_y[r * len(where):(r + 1) * len(where)]
        return x, y

    def state_dict(self):
        return {"drawn": self.drawn, "datasets": [sampler.state_dict() for sampler in self.samplers]}

    def load_state_dict(self, state):
        self.drawn = int(state["drawn"])
        for sampler, sub in zip(self.samplers, state["datasets"]):
            sampler.load_state_dict(sub)
