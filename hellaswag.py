"""HellaSwag validation accuracy, scored the way lm-evaluation-harness's `hellaswag` task scores
it, so that grafito's figures sit beside published ones (docs/evaluation.md).

An item is a context and four endings, one of them right. The harness's zero-shot prompt is
the query preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()); each ending is
preprocess(ending) and is scored as the continuation " " + ending. A continuation's tokens are
those of query + continuation after the query's own tokens, and its score is the sum of their
log-probabilities. acc takes the ending with the highest score; acc_norm the highest score
divided by the ending's length in characters (of the preprocessed ending, without the space).
A row longer than the model's context keeps its last block_size + 1 tokens, as the harness does.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import hub
import tokenizer
from common import GrafitoError, autocast, eval_mode
from loss import AnswerLogProbs

HUB_REPO = "Rowan/hellaswag"  # the dataset the harness's hellaswag.yaml reads (dataset_path)
HUB_FILE = "data/validation-00000-of-00001.parquet"  # its validation split
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
DELIMITER = " "  # the harness's target_delimiter, between the query and each ending
LOCAL_HINT = ("Give a local copy instead: --hellaswag=PATH to hellaswag_val.jsonl (the original release's "
              "validation file) or to the hub's validation-00000-of-00001.parquet.")


def preprocess(text):
    """The harness's clean-up of WikiHow's markup, step by step in its order."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")  # one pass: three spaces become two, as in the harness


@dataclass
class Item:
    query: str
    choices: list  # the preprocessed endings
    label: int


def item_from_record(record):
    """An Item from one HellaSwag record (str.capitalize also lowers the rest of ctx_b, as in the harness)."""
    query = preprocess(record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize())
    return Item(query, [preprocess(ending) for ending in record["endings"]], int(record["label"]))


# ----------------------------------------------------------------------------- reading the items

def load_items(source, limit=0):
    """(items, provenance) from --hellaswag: 'hub' (HUB_REPO's validation file, through the hub
    cache) or a local .jsonl/.parquet file; the first `limit` items when limit > 0. provenance
    says which file (and hub revision) and its sha256, for the results' JSON."""
    if source == "hub":
        path = hub.download(HUB_REPO, HUB_FILE, repo_type="dataset", local_hint=LOCAL_HINT)
        snapshot = path.parents[len(Path(HUB_FILE).parts) - 1].name  # the cache's snapshots/<commit>/ folder
        provenance = {"hub": HUB_REPO, "file": HUB_FILE,
                      "revision": snapshot if re.fullmatch(r"[0-9a-f]{40}", snapshot) else None}
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise GrafitoError(f"--hellaswag={source}: no such file; give HellaSwag's validation file "
                               f"(hellaswag_val.jsonl, or the hub's parquet) or --hellaswag=hub")
        provenance = {"file": str(path)}
    records = read_parquet(path) if path.suffix == ".parquet" else read_json_lines(path)
    items = []
    for where, record in records:
        items.append(checked_item(record, f"{path}, {where}"))
        if len(items) == limit:
            break
    if not items:
        raise GrafitoError(f"{path}: no HellaSwag items in the file")
    provenance["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return items, provenance


def read_json_lines(path):
    """('line N', record) for each non-empty line of a JSON-lines file."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise GrafitoError(f"{path}, line {number}: not JSON ({err.msg}); HellaSwag's file holds "
                                       f"one JSON object a line") from None
                yield f"line {number}", record
    except UnicodeDecodeError as err:
        raise GrafitoError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); give the .jsonl "
                           f"or .parquet validation file") from None
    except OSError as err:
        raise GrafitoError(f"{path}: {err.strerror or err}") from None


def read_parquet(path):
    """('row N', record) for each row of a parquet file (the hub's layout: label as a string)."""
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise GrafitoError(f"{path}: not a readable parquet file ({err})") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", record


def checked_item(record, where):
    """An Item, or one error saying what is wrong with the record and where."""
    if not isinstance(record, dict):
        raise GrafitoError(f"{where}: expected a JSON object with {', '.join(FIELDS)}")
    missing = [field for field in FIELDS if field not in record]
    if missing:
        raise GrafitoError(f"{where}: no {', '.join(missing)} (fields seen: {', '.join(map(str, record)) or 'none'}); "
                           f"a HellaSwag item has {', '.join(FIELDS)}")
    texts = [record[f] for f in ("activity_label", "ctx_a", "ctx_b")]
    endings = record["endings"]
    if not all(isinstance(t, str) for t in texts) or not isinstance(endings, list) \
            or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise GrafitoError(f"{where}: activity_label, ctx_a and ctx_b must be texts and endings a list of texts")
    label = record["label"]
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if type(label) is not int or not 0 <= label < len(endings):
        raise GrafitoError(f"{where}: label {record['label']!r} is not the index of one of its {len(endings)} "
                           f"endings (the test split has no labels: use the validation split)")
    return item_from_record({**record, "label": label})


# ----------------------------------------------------------------------------- scoring

def choice_rows(item, block_size):
    """(rows, cut): per ending, its token ids and how many of the last ones are the continuation,
    kept to their last block_size + 1 tokens as the harness cuts, and whether any row was cut;
    None for an item with an ending whose continuation alone exceeds the context (the harness
    cannot score it either)."""
    context = item.query.rstrip()
    moved = item.query[len(context):]  # the harness moves a query's trailing spaces into the continuation
    context_ids = tokenizer.encode(context)
    rows = []
    for choice in item.choices:
        whole = tokenizer.encode(context + moved + DELIMITER + choice)
        continuation = whole[len(context_ids):]
        if len(continuation) > block_size:
            return None
        rows.append(((context_ids + continuation)[-(block_size + 1):], len(continuation)))
    return rows, any(len(context_ids) + n > block_size + 1 for _, n in rows)


@torch.no_grad()
def score_items(model, items, device, dtype, tokens_per_batch, progress=True):
    """(scores, cut): each item's endings' summed continuation log-probabilities, float64 (None
    for an item too long for the context), and how many items were cut from the left. The rows
    of all items go through the model in batches of at most tokens_per_batch positions
    (right-padded), longest first, in eval mode under the dtype's autocast."""
    rows, scores, cut = [], [], 0  # rows: (ids, continuation length, item, ending)
    for i, item in enumerate(items):
        encoded = choice_rows(item, model.config.block_size)
        scores.append(None if encoded is None else np.zeros(len(item.choices)))
        if encoded is not None:
            rows += [(ids, n, i, j) for j, (ids, n) in enumerate(encoded[0])]
            cut += encoded[1]
    rows.sort(key=lambda row: -len(row[0]))
    bar = tqdm(total=len(rows), desc="HellaSwag", unit="ending", disable=not progress, dynamic_ncols=True)
    with eval_mode(model):
        start = 0
        while start < len(rows):
            width = len(rows[start][0]) - 1  # the batch's longest input: the others are padded to it
            batch = rows[start:start + max(1, tokens_per_batch // width)]
            x = np.zeros((len(batch), width), dtype=np.int64)
            y = np.full((len(batch), width), -1, dtype=np.int64)
            for r, (ids, n, _, _) in enumerate(batch):
                x[r, :len(ids) - 1] = ids[:-1]
                y[r, len(ids) - 1 - n:len(ids) - 1] = ids[-n:]  # targets only where a continuation token is predicted
            with autocast(device, dtype):
                log_probs = AnswerLogProbs(model)(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            for (_, _, i, j), value in zip(batch, log_probs.float().cpu().tolist()):
                scores[i][j] = value
            start += len(batch)
            bar.update(len(batch))
    bar.close()
    return scores, cut


def accuracy(items, scores):
    """acc and acc_norm over the scored items (those with scores), with the harness's standard
    errors (sample standard deviation / sqrt(n)); ties go to the first ending, as numpy's argmax."""
    scored = [(item, s) for item, s in zip(items, scores) if s is not None]
    right, right_norm = [], []
    for item, s in scored:
        lengths = np.array([len(choice) for choice in item.choices], dtype=np.float64)
        right.append(float(np.argmax(s) == item.label))
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty ending: -inf, as in the harness
            right_norm.append(float(np.argmax(s / lengths) == item.label))
    n = len(scored)
    result = {"n": n}
    for name, values in (("acc", right), ("acc_norm", right_norm)):
        result[name] = sum(values) / n if n else None
        result[f"{name}_stderr"] = math.sqrt(np.var(values, ddof=1) / n) if n > 1 else None
    return result


def evaluate(model, items, device, dtype, tokens_per_batch, progress=True):
    """acc, acc_norm and their standard errors, n (items scored), items cut from the left to fit
    the context, and items left out because an ending alone exceeds it."""
    scores, cut = score_items(model, items, device, dtype, tokens_per_batch, progress)
    return {**accuracy(items, scores), "cut_from_left": cut,
            "longer_than_context": sum(s is None for s in scores)}
