"""eval.py: the original zero-shot table, val loss as training measures it, short-answer accuracy."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import engine
import eval as grafito_eval
import tokenizer
from common import GrafitoError
from conftest import ROOT
from loss import masked_val_loss
from model import GPT


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_batched_answers_equal_each_prompt_alone(tiny_model_dir):
    model_engine = engine.Engine(GPT.from_pretrained(tiny_model_dir))
    queries = ["hi", "what is the capital of france, in one word", "2+2?"]  # prompts of different lengths
    batched = grafito_eval.greedy_answers(model_engine, queries, 10, batch_size=3)
    alone = [grafito_eval.greedy_answers(model_engine, [q], 10, batch_size=1)[0] for q in queries]
    assert batched == alone and any(alone)


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
