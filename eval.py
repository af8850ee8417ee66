"""Reproduce the original grafito README's zero-shot table for any models, with real metrics beside it.

    python eval.py --models=gpt2,gpt2-medium,out/ruby_002
    python eval.py --models=base-124m=gpt2,ruby-002=out/ruby_002 --out=eval/zero_shot.md

For each model: the six README queries, "custom prompted" (wrapped in the chat template),
answered greedily; a markdown table with one row per query and one column per model, cells
cut to 33 characters with '..' as in the README, '(repeats the query)' for an answer that
only repeats it. Beside it: masked validation loss and perplexity on every prepared dataset
with a val split (data/*/, or --datasets), and the share of held-out short-answer questions from grafito-25k's val split
whose greedy answer contains the reference answer. On every preference-pairs dataset
(data/*/ of kind pairs, or --pairs_datasets), the preference accuracy: the share of val pairs
whose chosen answer the model finds more likely than the rejected one, by the answers' summed
log-probabilities and by their log-probabilities per token (a tie counts half), so that an
SFT model and its DPO successor compare in one table. With --hellaswag (a local copy of the
validation file, or hub), HellaSwag acc and acc_norm scored as lm-evaluation-harness scores
them (hellaswag.py, docs/evaluation.md). The table goes to --out, everything to the .json beside it.

    python eval.py --models=gpt2 --hellaswag=hub --dtype=float32
"""

import json
import math
import os
import re
import string
import sys
import time
from pathlib import Path

import numpy as np

import checkpoint
import data
import engine
import hellaswag
import quantize
import tokenizer
from common import DTYPES, GrafitoError, read_text, run_cli, setup
from configurator import check_options, integer, load_config
from loss import masked_val_loss, pair_log_probs

# The README shows the last query only as "write a code in python to sum 2.."; its end is ours.
README_QUERIES = [
    "what is 2+2",
    "what's your purpose",
    "i'm in a bad situtation",  # sic, as in the README
    "what's your name",
    "how can i make a videogame",
    "write a code in python to sum 2 numbers",
]

DEFAULTS = dict(
    models="gpt2",  # comma-separated model sources, each optionally label=source
    queries="",  # a text file with one query per line instead of the README's six
    out="eval/zero_shot.md",  # the table; the JSON with all numbers goes beside it (.json)
    max_new_tokens=48,
    datasets="",  # comma-separated prepared datasets for val loss; empty: every chat (SFT) and text dataset in data/
    pairs_datasets="",  # comma-separated preference-pairs datasets for preference accuracy; empty: every one in data/
    eval_iters=0,  # val batches per dataset, 0 for all
    accuracy_samples=200,  # short-answer questions from accuracy_dataset's val split, 0 to skip
    accuracy_dataset="grafito25k",
    hellaswag="",  # HellaSwag's validation file (.jsonl or .parquet), or hub to download it; empty: skip
    hellaswag_limit=0,  # score only the first N HellaSwag items, 0 for all
    batch_size=8,
    device="auto",
    dtype="auto",
    quantize="",  # int8 | w8a8 (quantize.py) for the val loss, the answers and everything else; CPUs only
)
CELL = 33  # the README's column width


def parse_models(spec):
    models = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        label, _, source = item.rpartition("=")
        if not source.strip():
            raise GrafitoError(f"--models: {item!r} names no model source")
        models.append((label or source, source))
    if not models:
        raise GrafitoError("--models is empty: give model sources, e.g. --models=gpt2,out/ruby_002")
    labels = [label for label, _ in models]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise GrafitoError(f"--models: the label {repeated[0]!r} is used twice; each column needs its own")
    return models


def cut(text):
    """One line of at most 33 characters, '..' marking a cut, as in the README."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= CELL else text[:CELL - 2] + ".."


def format_cell(answer, query):
    """A table cell for an answer: '(repeats the query)' when it says nothing but the query."""
    if answer.strip() and not re.sub(re.escape(tokenizer.squash(query)), "", tokenizer.squash(answer)):
        return "(repeats the query)"
    return cut(answer)


def markdown_table(queries, labels, answers):
    """answers[label][i] is the model's answer to queries[i]."""
    header = ["query (custom prompted)"] + labels
    rows = [[cut(q)] + [format_cell(answers[label][i], q) for label in labels]
            for i, q in enumerate(queries)]
    widths = [max(CELL, len(h)) for h in header]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]) + "\n"


def greedy_answers(model_engine, queries, max_new_tokens, batch_size):
    """Greedy answers to queries in the chat template, batch_size at a time."""
    answers = []
    for start in range(0, len(queries), batch_size):
        prompts = [tokenizer.render_prompt([], q) for q in queries[start:start + batch_size]]
        answers += engine.answers(model_engine, prompts, max_new_tokens, engine.Sampling(temperature=0.0))[0]
    return answers


def normalize_answer(text):
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains_answer(reply, reference):
    """The normalised reference appears in the normalised reply as whole words ('5' is not in '1945')."""
    return f" {normalize_answer(reference)} " in f" {normalize_answer(reply)} "


def short_answer_questions(dataset, n):
    """Up to n single-turn val conversations whose answer has at most 5 words."""
    if n == 0:
        return []
    split = data.load_split(dataset, "val")
    questions = []
    for i in range(split.num_conversations):
        turns = tokenizer.turns_from_rendered(*split.conversation(i))
        if len(turns) == 1 and 0 < len(turns[0][1].split()) <= 5 and normalize_answer(turns[0][1]):
            questions.append(turns[0])
            if len(questions) == n:
                break
    return questions


def prepared_datasets(names, kind="sft"):
    """The datasets to measure: 'sft' val loss (chat and text datasets), 'pairs' preference
    accuracy; those named, or every one of those kinds in data/. Those without a val split are
    skipped, with a note."""
    option = "--pairs_datasets" if kind == "pairs" else "--datasets"
    kinds = ("pairs",) if kind == "pairs" else ("sft", "text")
    if names:
        names = [n.strip() for n in names.split(",") if n.strip()]
        for name in names:
            found = data.dataset_kind(data.load_meta(name))
            if found not in kinds and found not in data.KINDS:
                raise GrafitoError(f"{option}: {name} is a {found} dataset, which eval.py does not measure")
            if found not in kinds:
                other = "--pairs_datasets (preference accuracy)" if found == "pairs" else "--datasets (val loss)"
                raise GrafitoError(f"{option}: {name} is {'an SFT' if found == 'sft' else 'a ' + found} dataset; "
                                   f"give it in {other}")
    else:
        # x.old is x during (or after an interrupted) rewrite; hidden folders are half-written
        names = sorted({p.name.removesuffix(".old") for p in data.DATA_ROOT.glob("*")
                        if not p.name.startswith(".") and (p / "meta.json").is_file()})
        names = [name for name in names if data.dataset_kind(data.load_meta(name)) in kinds]
    kept = []
    for name in names:
        val = data.load_meta(name)["splits"].get("val", {})
        if val.get("conversations", 0) or val.get("documents", 0):
            kept.append(name)
        else:
            print(f"(no {'preference accuracy' if kind == 'pairs' else 'val loss'} on {name}: it was prepared "
                  f"without a val split)", file=sys.stderr)
    return kept


def preference_accuracy(model, name, config, device, dtype):
    """How often the model prefers the chosen answer of a pairs dataset's val pairs, by the answers'
    summed and per-token log-probabilities; pairs longer than the model's context are left out
    (cut, a row would lose its answer) and counted. None when no pair fits."""
    split = data.load_pairs(name, "val")
    longest = split.row_lengths.max(axis=1)
    fits = np.flatnonzero(longest <= model.config.block_size + 1)  # a row's last token is only a target
    if config["eval_iters"]:
        fits = fits[:config["eval_iters"] * config["batch_size"]]
    if not len(fits):
        print(f"(no preference accuracy on {name}: its val pairs are longer than the model's context)", file=sys.stderr)
        return None
    batcher = data.PairBatches(split, int(longest.max()) - 1, shuffle=False, pad_multiple=1)  # no padding past the context
    size = config["batch_size"]
    batches = [(pairs, *batcher.batch(pairs)) for pairs in np.split(fits, range(size, len(fits), size))]
    log_probs, lengths = pair_log_probs(model, batches, device, dtype)
    per_token = log_probs / lengths

    def share(scores):
        return ((scores[:, 0] > scores[:, 1]).float() + 0.5 * (scores[:, 0] == scores[:, 1]).float()).mean().item()

    return {"pairs": len(fits), "longer_than_context": int((longest > model.config.block_size + 1).sum()),
            "accuracy": share(log_probs), "accuracy_per_token": share(per_token),
            "margin": (log_probs[:, 0] - log_probs[:, 1]).mean().item()}


def val_batches(name, block_size, config):
    """A dataset's val split as (x, y) batches, target -1 where nothing is measured: a chat
    dataset's answers, every token of a text dataset (consecutive windows of its documents)."""
    if data.dataset_kind(data.load_meta(name)) == "text":
        return data.TextEvalBatches(data.load_text(name, "val"), block_size, config["batch_size"], config["eval_iters"])
    return data.eval_batches(data.load_split(name, "val"), block_size, config["batch_size"], config["eval_iters"])


def evaluate_model(label, source, config, queries, questions, datasets, pairs_datasets=(), hellaswag_items=None):
    device, dtype = setup(config["device"], config["dtype"])
    started = time.perf_counter()
    model = quantize.quantize(checkpoint.load_model(source).eval(), config["quantize"], DTYPES[dtype]).to(device)
    result = {"label": label, "source": str(source), "dtype": dtype, "quantize": config["quantize"], "val": {},
              "preference": {}}
    for name in datasets:  # float32 weights under autocast, as train.py evaluates: the same numbers
        block = min(model.config.block_size, data.load_meta(name).get("block_size", model.config.block_size))
        batches = val_batches(name, block, config)
        loss = masked_val_loss(model, batches, device, dtype)
        result["val"][name] = {"loss": loss, "perplexity": math.exp(min(loss, 50)),
                               "tokens": int(sum((y >= 0).sum() for _, y in batches))}
    for name in pairs_datasets:
        result["preference"][name] = preference_accuracy(model, name, config, device, dtype)
    if hellaswag_items:  # as many positions a forward as a val-loss batch holds
        tokens = config["batch_size"] * model.config.block_size
        result["hellaswag"] = hellaswag.evaluate(model, hellaswag_items, device, dtype, tokens)
        if result["hellaswag"]["longer_than_context"]:
            print(f"({result['hellaswag']['longer_than_context']} HellaSwag items left out: an ending alone is "
                  f"longer than {label}'s context)", file=sys.stderr)
    model_engine = engine.Engine(model.to(DTYPES[dtype]))  # generation reads weights in the chosen dtype
    result["answers"] = greedy_answers(model_engine, queries, config["max_new_tokens"], config["batch_size"])
    if questions:
        replies = greedy_answers(model_engine, [q for q, _ in questions], 24, config["batch_size"])
        hits = [contains_answer(reply, ref) for (_, ref), reply in zip(questions, replies)]
        result["short_answer_accuracy"] = {"correct": sum(hits), "samples": len(hits), "accuracy": sum(hits) / len(hits)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    del model
    return result


def metrics_table(results, datasets, pairs_datasets=()):
    with_hellaswag = any("hellaswag" in r for r in results)
    header = (["model"] + [f"{d} val loss (ppl)" for d in datasets]
              + [f"{d} preference accuracy (summed / per token)" for d in pairs_datasets] + ["short-answer accuracy"]
              + ["HellaSwag acc / acc_norm (items)"] * with_hellaswag)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["label"]] + [f"{r['val'][d]['loss']:.3f} ({r['val'][d]['perplexity']:.1f})" for d in datasets]
        cells += [f"{r['preference'][d]['accuracy']:.1%} / {r['preference'][d]['accuracy_per_token']:.1%}"
                  if r["preference"].get(d) else "-" for d in pairs_datasets]
        acc = r.get("short_answer_accuracy")
        cells.append(f"{acc['accuracy']:.1%} ({acc['correct']}/{acc['samples']})" if acc else "-")
        if with_hellaswag:
            h = r.get("hellaswag")
            cells.append(f"{h['acc']:.2%} / {h['acc_norm']:.2%} ({h['n']})" if h and h["n"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RULES = {"max_new_tokens": integer(1, 1 << 16), "batch_size": integer(1, 1 << 12), "eval_iters": integer(0),
         "accuracy_samples": integer(0), "hellaswag_limit": integer(0), **quantize.RULES}


def check_config(config):
    check_options(config, RULES)
    if config["hellaswag_limit"] and not config["hellaswag"]:
        raise GrafitoError("--hellaswag_limit needs --hellaswag=FILE (or hub): the HellaSwag items to score")
    device, _ = setup(config["device"], config["dtype"])  # an unavailable device or unknown dtype: said before any work
    quantize.check(config["quantize"], device)


def prepare_out(out):
    """The table's path, made writable now rather than after hours of evaluation."""
    out = Path(out)
    if out.is_dir() or out.suffix == ".json":  # the JSON goes beside the table, as <out>.json
        raise GrafitoError(f"--out={out}: give the table's file name, such as {out.with_suffix('') / 'zero_shot.md'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GrafitoError(f"--out={out}: cannot create its folder ({err.strerror or err})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise GrafitoError(f"--out={out}: not writable")
    return out


def main():
    config = load_config(DEFAULTS)
    check_config(config)
    models = parse_models(config["models"])
    out = prepare_out(config["out"])
    hellaswag_items, hellaswag_data = None, None
    if config["hellaswag"]:  # read (or downloaded) first: a bad file or no network is said before any work
        hellaswag_items, hellaswag_data = hellaswag.load_items(config["hellaswag"], config["hellaswag_limit"])
        hellaswag_data["items"] = len(hellaswag_items)
    if config["queries"]:
        text = read_text(config["queries"], f"--queries={config['queries']}")
        queries = [q.strip() for q in text.splitlines() if q.strip()]
        if not queries:
            raise GrafitoError(f"--queries={config['queries']}: no queries in the file")
    else:
        queries = README_QUERIES
    datasets = prepared_datasets(config["datasets"])
    pairs_datasets = prepared_datasets(config["pairs_datasets"], kind="pairs")
    questions = []
    if config["accuracy_samples"]:
        try:
            questions = short_answer_questions(config["accuracy_dataset"], config["accuracy_samples"])
        except GrafitoError as err:
            print(f"(no short-answer accuracy: {err})", file=sys.stderr)
    results = []
    for label, source in models:
        print(f"evaluating {label} ({source}) ...", file=sys.stderr)
        results.append(evaluate_model(label, source, config, queries, questions, datasets, pairs_datasets,
                                      hellaswag_items))
    labels = [r["label"] for r in results]
    table = markdown_table(queries, labels, {r["label"]: r["answers"] for r in results})
    metrics = metrics_table(results, datasets, pairs_datasets)
    out.write_text(table + "\n" + metrics)
    out.with_suffix(".json").write_text(json.dumps({"queries": queries, "config": config, "hellaswag_data": hellaswag_data,
                                                   "results": results}, indent=2) + "\n")
    print(table)
    print(metrics)
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    run_cli(main)
