"""eval.py: the original zero-shot table, val loss as training measures it, short-answer accuracy, HellaSwag."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import data
import engine
import eval as grafito_eval
import hellaswag
import tokenizer
from common import GrafitoError
from conftest import ROOT
from loss import masked_val_loss
from model import GPT


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_batched_answers_equal_each_prompt_alone(taught_model):
    # a taught model: its answers differ and some end early (end-of-text) while others run on, so a
    # row that stopped with its neighbour, or took its text, would show; a random model's would not
    model_engine = engine.Engine(taught_model)
    queries = ["hi", "what is the capital of france", "tell me a story", "what is 2+2"]  # prompts of different lengths
    batched = grafito_eval.greedy_answers(model_engine, queries, 24, batch_size=4)
    alone = [grafito_eval.greedy_answers(model_engine, [q], 24, batch_size=1)[0] for q in queries]
    assert batched == alone
    assert alone[1] == "Paris is the capital of France." and len(set(alone)) == 4  # its 8th token is end-of-text
    story = engine.answers(model_engine, [tokenizer.render_prompt([], queries[2])], 24, engine.Sampling(temperature=0))
    assert story[1] == 24  # steps: this one runs on to max_new_tokens


def test_eval_cells_follow_the_readme():
    assert grafito_eval.format_cell("what is 2+2", "what is 2+2") == "(repeats the query)"
    assert grafito_eval.format_cell("What is 2 + 2? what is 2+2", "what is 2+2") == "(repeats the query)"
    assert grafito_eval.format_cell("2+2 is a unit of measurement for the length", "what is 2+2") == "2+2 is a unit of measurement fo.."
    assert len(grafito_eval.format_cell("x" * 100, "q")) == 33
    assert grafito_eval.format_cell("a\nb | c", "q") == "a b \\| c"
    assert grafito_eval.format_cell("", "q") == ""


def test_eval_cli_writes_the_table_and_json(tiny_model_dir, tmp_path):
    conversations = [[(f"who is person {i}", f"name {i}")] for i in range(6)]
    data.write_dataset(tmp_path / "ds", {"train": tokenizer.render_batch(conversations[:2]),
                                         "val": tokenizer.render_batch(conversations)}, {"dataset": "ds", "block_size": 64})
    data.write_dataset(tmp_path / "no_val", {"train": tokenizer.render_batch(conversations), "val": []},
                       {"dataset": "no_val", "block_size": 64})
    out = tmp_path / "zs.md"
    result = run_script(ROOT / "eval.py", f"--models=tiny-a={tiny_model_dir},{tiny_model_dir}", f"--out={out}",
                        f"--datasets={tmp_path / 'ds'},{tmp_path / 'no_val'}", f"--accuracy_dataset={tmp_path / 'ds'}",
                        "--max_new_tokens=6", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    assert "no val loss on" in result.stderr and "no_val" in result.stderr
    lines = out.read_text().splitlines()
    table = lines[:2 + len(grafito_eval.README_QUERIES)]
    assert table[0].startswith("| query (custom prompted)") and "tiny-a" in table[0] and str(tiny_model_dir) in table[0]
    assert all(line.count(" | ") == 2 for line in table)
    assert "i'm in a bad situtation" in out.read_text()
    results = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in results["results"]] == ["tiny-a", str(tiny_model_dir)]
    first = results["results"][0]
    assert len(first["answers"]) == 6 and first["short_answer_accuracy"]["samples"] == 6
    assert list(first["val"]) == [str(tmp_path / "ds")]
    model = GPT.from_pretrained(tiny_model_dir).eval()  # the val loss over the packed rows, computed the plain way
    losses, count = 0.0, 0
    for x, y in data.eval_batches(data.load_split(tmp_path / "ds", "val"), 64, 1):
        logits, _ = model(torch.from_numpy(x))
        losses += F.cross_entropy(logits[0], torch.from_numpy(y[0]), ignore_index=-1, reduction="sum").item()
        count += int((y >= 0).sum())
    assert first["val"][str(tmp_path / "ds")]["tokens"] == count
    assert abs(first["val"][str(tmp_path / "ds")]["loss"] - losses / count) < 1e-4


def test_eval_lists_prepared_datasets_and_measures_bf16_like_training(tiny_model_dir, tmp_path, monkeypatch):
    conversations = [[(f"who is person {i}", f"name {i}")] for i in range(4)]
    for name, val in [("a", conversations), ("b.old", conversations), (".a.tmp-1", conversations), ("c", [])]:
        data.write_dataset(tmp_path / name, {"train": tokenizer.render_batch(conversations), "val":
                                             tokenizer.render_batch(val)}, {"dataset": name, "block_size": 64})
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)
    # b.old is b caught mid-rewrite; the hidden folder is half-written; c has no val split
    assert grafito_eval.prepared_datasets("") == ["a", "b"]
    config = {**grafito_eval.DEFAULTS, "device": "cpu", "dtype": "bfloat16", "max_new_tokens": 2}
    result = grafito_eval.evaluate_model("tiny", tiny_model_dir, config, ["hi"], [], ["a"])
    batches = data.eval_batches(data.load_split("a", "val"), 64, config["batch_size"])
    expected = masked_val_loss(GPT.from_pretrained(tiny_model_dir), batches, "cpu", "bfloat16")
    assert result["val"]["a"]["loss"] == pytest.approx(expected, abs=1e-6)


def test_eval_option_errors_are_clear():
    with pytest.raises(GrafitoError, match="label 'x' is used twice"):
        grafito_eval.parse_models("x=out/a,x=out/b")
    with pytest.raises(GrafitoError, match="names no model source"):
        grafito_eval.parse_models("a=")
    with pytest.raises(GrafitoError, match="batch_size = 0 is invalid"):
        grafito_eval.check_config({**grafito_eval.DEFAULTS, "batch_size": 0})


def test_eval_refuses_a_json_or_folder_as_the_table_file(tmp_path):
    with pytest.raises(GrafitoError, match="give the table's file name"):
        grafito_eval.prepare_out(tmp_path)
    with pytest.raises(GrafitoError, match="give the table's file name"):
        grafito_eval.prepare_out(tmp_path / "x.json")


def test_short_answer_accuracy_matches_whole_words():
    assert grafito_eval.contains_answer("It is 5.", "5") and not grafito_eval.contains_answer("In 1945", "5")
    assert grafito_eval.contains_answer("The answer: the Eiffel Tower!", "Eiffel tower")


# ----------------------------------------------------------------------------- HellaSwag

# Items written for these tests, each with its query and endings after the harness's preprocessing,
# derived by hand: strip; " [title]" -> ". "; drop [...] (shortest match); "  " -> " " in one pass;
# ctx_b.capitalize() upper-cases its first letter and lower-cases the rest.
HELLASWAG_ITEMS = [
    ({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
      "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                  "starts pulling up roofing on a roof."], "label": 3},
     "Roof shingle removal: A man is sitting on a roof. He",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."]),
    ({"activity_label": "Baking cookies", "ctx_a": "A woman opens an  oven.", "ctx_b": "then SHE",
      "endings": ["  puts the Tray in [step] quickly.", "sings.", "walks away [title] Leaves the house", "x"], "label": 0},
     "Baking cookies: A woman opens an oven. Then she",
     ["puts the Tray in quickly.", "sings.", "walks away. Leaves the house", "x"]),
    # a query ending in " [title]" keeps a trailing space; an ending starting with [...] keeps a leading one
    ({"activity_label": "Health", "ctx_a": "[header] How to rest [title] Lie down. [step] Close your eyes [title]",
      "ctx_b": "", "endings": ["[substeps] Breathe   slowly.", "Run [a] [b] fast.", "Sleep well.", "Eat [title] Now"],
      "label": 2},
     "Health: How to rest. Lie down. Close your eyes. ",
     [" Breathe  slowly.", "Run  fast.", "Sleep well.", "Eat. Now"]),
    # longer than the test model's context: cut from the left
    ({"activity_label": "Counting", "ctx_a": "They count: " + ", ".join(f"number {i}" for i in range(30)) + ".",
      "ctx_b": "", "endings": ["then they stop.", "and they go on counting for a long while.", "sleep.", "it rains."],
      "label": 1},
     "Counting: They count: " + ", ".join(f"number {i}" for i in range(30)) + ".",
     ["then they stop.", "and they go on counting for a long while.", "sleep.", "it rains."]),
]


def test_hellaswag_preprocessing_follows_the_harness():
    assert hellaswag.preprocess("  Hello [title] World  ") == "Hello. World"
    assert hellaswag.preprocess("a   b") == "a  b"  # one pass, as str.replace does it
    assert hellaswag.preprocess("keep [a] this [b] too") == "keep this too"  # [a] and [b], not "[a] this [b]"
    assert hellaswag.preprocess("[title] Foo") == " Foo"  # no space before it: dropped as any bracket
    for record, query, choices in HELLASWAG_ITEMS:
        item = hellaswag.item_from_record(record)
        assert (item.query, item.choices, item.label) == (query, choices, record["label"])


def write_hellaswag_jsonl(path, records):
    path.write_text("".join(json.dumps({**r, "ctx": r.get("ctx_a", "") + " " + r.get("ctx_b", "")}) + "\n" for r in records))
    return path


@pytest.fixture
def hellaswag_model(hf_checkpoint):
    """A tiny transformers GPT-2 with the real vocabulary and a 48-token context, its attention
    sharpened (q and k scaled up) so that the context decides the scores."""
    folder, model = hf_checkpoint(vocab_size=50257, n_positions=48, n_embd=32, seed=3)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :64] *= 6.0  # Conv1D (in, out): the q and k columns
    model.save_pretrained(folder)
    return folder, model


def transformers_scores(model, query, choices, n_positions):
    """Each ending's summed log-probability, computed plainly with transformers, one row at a time."""
    encode = tokenizer.get_encoding().encode_ordinary
    context, moved = query.rstrip(), query[len(query.rstrip()):]
    context_ids = encode(context)
    scores = []
    for choice in choices:
        continuation_ids = encode(context + moved + " " + choice)[len(context_ids):]
        ids = (context_ids + continuation_ids)[-(n_positions + 1):]
        with torch.no_grad():
            log_probs = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
        targets = ids[1:]
        scores.append(sum(log_probs[t, targets[t]].item() for t in range(len(targets) - len(continuation_ids), len(targets))))
    return scores


def test_hellaswag_scores_equal_transformers(hellaswag_model):
    folder, reference = hellaswag_model
    expected = [transformers_scores(reference, query, choices, 48) for _, query, choices in HELLASWAG_ITEMS]
    labels = [record["label"] for record, _, _ in HELLASWAG_ITEMS]
    lengths = [[len(c) for c in choices] for _, _, choices in HELLASWAG_ITEMS]
    predicted = [max(range(4), key=lambda j: s[j]) for s in expected]
    predicted_norm = [max(range(4), key=lambda j: s[j] / n[j]) for s, n in zip(expected, lengths)]
    assert predicted != predicted_norm  # the length normalisation decides something here
    assert min(abs(a - b) for s in expected for a in s for b in s if a != b) > 1e-3  # no near-ties to blur acc

    items = [hellaswag.item_from_record(record) for record, _, _ in HELLASWAG_ITEMS]
    too_long = hellaswag.Item("Q: a", ["word " * 60, "b", "c", "d"], 0)  # an ending alone exceeds the 48 positions
    # all rows of all items, right-padded, in two forwards
    scores, cut = hellaswag.score_items(GPT.from_pretrained(folder), items + [too_long], "cpu", "float32", 500,
                                        progress=False)
    assert cut == 1 and scores[-1] is None
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=2e-4)
    result = hellaswag.accuracy(items + [too_long], scores)
    assert result["n"] == 4
    assert result["acc"] == sum(p == y for p, y in zip(predicted, labels)) / 4
    assert result["acc_norm"] == sum(p == y for p, y in zip(predicted_norm, labels)) / 4


def test_hellaswag_acc_norm_divides_by_characters():
    items = [hellaswag.Item("q", ["ab", "abcdef"], 1),  # per character: ending 1; per character + 1: ending 0
             hellaswag.Item("q", ["\u00e9\u00e9\u00e9", "abcd"], 1),  # per character: ending 1; per UTF-8 byte: 0
             hellaswag.Item("q", ["a", "b"], 0)]  # a tie goes to the first ending
    result = hellaswag.accuracy(items, [[-2.2, -6.0], [-3.3, -4.0], [-1.0, -1.0]])
    assert result["n"] == 3 and result["acc"] == pytest.approx(1 / 3) and result["acc_norm"] == 1.0
    assert result["acc_stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5) and result["acc_norm_stderr"] == 0.0


class FakeDatasetHub(http.server.BaseHTTPRequestHandler):
    """Answers /datasets/Rowan/hellaswag/resolve/main/<file> from a folder, as the hub does."""
    folder = None
    commit = "0123456789abcdef0123456789abcdef01234567"

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        prefix = "/datasets/Rowan/hellaswag/resolve/main/"
        path = self.path.split("?")[0]
        file = self.folder / path.removeprefix(prefix) if path.startswith(prefix) else None
        if file is None or not file.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        content = file.read_bytes()
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, *args):
        pass


def test_eval_cli_scores_hellaswag_downloaded_from_the_hub(hellaswag_model, tmp_path):
    import pyarrow
    import pyarrow.parquet

    folder, _ = hellaswag_model
    records = [record for record, _, _ in HELLASWAG_ITEMS]
    served = tmp_path / "served" / "data" / "validation-00000-of-00001.parquet"  # the hub's layout: labels as strings
    served.parent.mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{**r, "label": str(r["label"])} for r in records]), served)
    jsonl = write_hellaswag_jsonl(tmp_path / "hellaswag_val.jsonl", records)  # the original release's layout
    items = hellaswag.load_items(jsonl)[0]
    assert hellaswag.load_items(served)[0] == items == [hellaswag.item_from_record(r) for r in records]

    FakeDatasetHub.folder = tmp_path / "served"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeDatasetHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    out = tmp_path / "zs.md"
    try:
        result = subprocess.run([sys.executable, ROOT / "eval.py", f"--models=tiny={folder}", f"--out={out}",
                                 "--hellaswag=hub", "--hellaswag_limit=3", "--datasets=", "--accuracy_samples=0",
                                 "--max_new_tokens=2", "--dtype=float32", "--device=cpu"],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["hellaswag_data"] == {"hub": "Rowan/hellaswag", "file": "data/validation-00000-of-00001.parquet",
                                         "revision": FakeDatasetHub.commit, "items": 3,
                                         "sha256": hashlib.sha256(served.read_bytes()).hexdigest()}
    scored = written["results"][0]["hellaswag"]
    expected = hellaswag.evaluate(GPT.from_pretrained(folder), items[:3], "cpu", "float32", 500, progress=False)
    assert scored == pytest.approx(expected) and scored["n"] == 3
    table = out.read_text()
    assert "HellaSwag acc / acc_norm (items)" in table and f"{scored['acc']:.2%} / {scored['acc_norm']:.2%} (3)" in table


def test_hellaswag_bad_files_are_one_clear_error(tmp_path):
    record = HELLASWAG_ITEMS[0][0]
    cases = [
        ([{k: v for k, v in record.items() if k != "ctx_b"}], r"line 1: no ctx_b \(fields seen: activity_label, ctx_a, endings, label, ctx\)"),
        ([record, {**record, "label": ""}], "line 2: label '' is not the index .* use the validation split"),
        ([{**record, "label": 4}], "label 4 is not the index of one of its 4 endings"),
        ([{**record, "endings": "one"}], "endings a list of texts"),
    ]
    for records, message in cases:
        with pytest.raises(GrafitoError, match=message):
            hellaswag.load_items(write_hellaswag_jsonl(tmp_path / "bad.jsonl", records))
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n{not json\n")
    with pytest.raises(GrafitoError, match="line 2: not JSON"):
        hellaswag.load_items(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GrafitoError, match="no HellaSwag items"):
        hellaswag.load_items(tmp_path / "empty.jsonl")
    with pytest.raises(GrafitoError, match="no such file.*--hellaswag=hub"):
        hellaswag.load_items(tmp_path / "missing.jsonl")
    with pytest.raises(GrafitoError, match="--hellaswag_limit needs --hellaswag"):
        grafito_eval.check_config({**grafito_eval.DEFAULTS, "hellaswag_limit": 5})


def test_hellaswag_offline_names_the_local_file(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(GrafitoError, match=r"'Rowan/hellaswag', file 'data/validation-00000-of-00001.parquet'.*"
                                           r"unreachable.*--hellaswag=PATH to hellaswag_val.jsonl") as raised:
        hellaswag.load_items("hub")
    assert "\n" not in str(raised.value)
