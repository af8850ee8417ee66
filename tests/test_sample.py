"""sample.py and eval.py: streaming answers, stops, chat history, few-shot, the zero-shot table."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as grafito_eval
import sample
import tokenizer
from common import GrafitoError
from conftest import ROOT
from model import GPT, GPTConfig
from tokenizer import EOT, AnswerStream, encode


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96)).save_pretrained(folder)
    return folder


def stream_all(tokens):
    stream, pieces = AnswerStream(), []
    for token in tokens:
        pieces.append(stream.add(token))
        if stream.done:
            break
    else:
        pieces.append(stream.finish())
    return stream, "".join(pieces)


def test_answer_stops_at_end_of_text_and_streams_the_same_text():
    stream, printed = stream_all(encode(" Paris is the capital.") + [EOT] + encode(" ignored"))
    assert stream.done and stream.text == printed == "Paris is the capital."


def test_answer_stops_at_a_new_instruction_and_never_prints_the_marker():
    tokens = encode(" Four.\n\n### Instruction: and more") + encode(" text")
    stream, printed = stream_all(tokens)
    assert stream.done and printed == stream.text == "Four."
    for k in range(1, len(tokens)):  # at every point, nothing printed runs into the marker
        partial, printed = stream_all(tokens[:k])
        assert "#" not in printed and printed == partial.text.split("#")[0].rstrip()


def test_answer_stream_never_splits_a_utf8_character():
    text = " café 😊 日本語 ok"
    tokens = encode(text)
    token_bytes = [tokenizer.get_encoding().decode_single_token_bytes(t) for t in tokens]
    assert any(b.decode("utf-8", "replace") != b.decode("utf-8", "ignore") for b in token_bytes)  # a split character
    stream, pieces = AnswerStream(), []
    for token in tokens:
        piece = stream.add(token)
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text == text.strip()


def test_raw_stream_keeps_spaces_and_markers_and_whole_characters():
    text = " there was ### Instruction: café 😊"
    stream, pieces = AnswerStream(raw=True), []
    for token in encode(text) + [EOT, 11]:
        piece = stream.add(token)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert stream.done and "".join(pieces) == stream.text == text


def test_a_partial_marker_that_is_not_a_marker_is_printed():
    stream, printed = stream_all(encode(" Use ## for headings"))
    assert printed == stream.text == "Use ## for headings"
    stream, printed = stream_all(encode(" Written in C#"))  # running out of tokens on a mid-line '#'
    assert printed == stream.text == "Written in C#"


def test_fit_prompt_drops_oldest_turns_then_truncates():
    said = []
    history = [(f"question {i} " + "word " * 10, f"answer {i}") for i in range(6)]
    ids, kept = sample.fit_prompt(history, "last question", block_size=120, max_new_tokens=40, warn=said.append)
    assert 0 < len(kept) < 6 and kept == history[-len(kept):]
    assert len(ids) <= 80 and ids == tokenizer.render_prompt(kept, "last question")
    assert said and "dropping the oldest turns" in said[0]
    ids, kept = sample.fit_prompt([], "word " * 200, block_size=120, max_new_tokens=40, warn=said.append)
    assert len(ids) == 80 and kept == [] and "keeping its last 80 tokens" in said[-1]
    ids, _ = sample.fit_prompt([], "word " * 200, block_size=120, max_new_tokens=500, warn=said.append)
    assert len(ids) == 60  # a long answer reserves half the context, not all of it


def test_same_seed_same_samples_and_batched_rows(tiny_model_dir):
    model = GPT.from_pretrained(tiny_model_dir).eval()
    config = {**sample.DEFAULTS, "max_new_tokens": 12, "temperature": 1.0, "top_k": 0}
    prompts = [tokenizer.render_prompt([], "hello")] * 3
    first, _, _ = sample.generate_answers(model, prompts, config, torch.Generator().manual_seed(5))
    again, _, _ = sample.generate_answers(model, prompts, config, torch.Generator().manual_seed(5))
    other, _, _ = sample.generate_answers(model, prompts, config, torch.Generator().manual_seed(6))
    assert first == again and first != other and len(first) == 3
    greedy = {**config, "temperature": 0.0}
    g1, _, _ = sample.generate_answers(model, prompts, greedy, torch.Generator().manual_seed(1))
    g2, _, _ = sample.generate_answers(model, prompts, greedy, torch.Generator().manual_seed(2))
    assert g1 == g2 and len(set(g1)) == 1


def test_eval_batches_answers_as_each_prompt_alone(tiny_model_dir):
    model = GPT.from_pretrained(tiny_model_dir).eval()
    queries = ["hi", "what is the capital of france, in one word", "2+2?"]  # different lengths: left padding
    batched = grafito_eval.greedy_answers(model, queries, 10, batch_size=3)
    greedy = {**sample.DEFAULTS, "temperature": 0.0, "max_new_tokens": 10}
    alone = [sample.generate_answers(model, [tokenizer.render_prompt([], q)], greedy)[0][0] for q in queries]
    assert batched == alone and any(alone)


def test_chat_keeps_history_in_the_template_and_clear_forgets(tiny_model_dir, capsys):
    model = GPT.from_pretrained(tiny_model_dir).eval()
    config = {**sample.DEFAULTS, "max_new_tokens": 6, "temperature": 0.0}
    seen_prompts = []
    real = sample.generate_answers

    def spy(model, prompts, config, generator, on_text=None):
        seen_prompts.append(tokenizer.decode(prompts[0]))
        return real(model, prompts, config, generator, on_text)

    sample.generate_answers = spy
    try:
        history = sample.chat(model, config, [], torch.Generator(), lines=["first question", "second one", "/clear",
                                                                         "fresh start", "/quit", "never read"])
    finally:
        sample.generate_answers = real
    assert seen_prompts[0] == "### Instruction: first question\n\n### Answer:"
    assert seen_prompts[1].startswith("### Instruction: first question\n\n### Answer:")
    assert seen_prompts[1].endswith("\n\n### Instruction: second one\n\n### Answer:")
    assert seen_prompts[2] == "### Instruction: fresh start\n\n### Answer:"
    assert len(history) <= 1 and (not history or history[0][0] == "fresh start")
    assert "(conversation cleared)" in capsys.readouterr().out


def test_shots_from_a_file_and_from_a_dataset(tmp_path):
    path = tmp_path / "shots.jsonl"
    path.write_text(json.dumps({"instruction": "2+2?", "answer": "4"}) + "\n\n" + json.dumps({"instruction": "3+3?", "answer": "6"}) + "\n")
    assert sample.load_shots(str(path), "", 0) == [("2+2?", "4"), ("3+3?", "6")]
    path.write_text('{"instruction": "x"}\n')
    with pytest.raises(GrafitoError, match="line 1: expected a JSON object"):
        sample.load_shots(str(path), "", 0)
    import data

    conversations = [[("q1", "a1")], [("q2", "a2"), ("q3", "a3")], [("q4", "a4")]]
    data.write_dataset(tmp_path / "d", {"train": tokenizer.render_batch(conversations), "val": []}, {"dataset": "d"})
    drawn = sample.load_shots("2", str(tmp_path / "d"), seed=0)
    assert all(turn in [t for c in conversations for t in c] for turn in drawn) and len(drawn) >= 2
    ids, mask = tokenizer.render(conversations[1])
    assert tokenizer.turns_from_rendered(ids, mask) == conversations[1]
    with pytest.raises(GrafitoError, match="has only 3 conversations"):
        sample.load_shots("4", str(tmp_path / "d"), seed=0)


def run_script(*args, stdin=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, input=stdin)


def test_sample_cli_answers_continues_and_chats_from_a_pipe(tiny_model_dir):
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--start=hi", "--max_new_tokens=5",
                        "--dtype=float32", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and "###" not in result.stdout
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--raw", "--start=Once upon",
                        "--max_new_tokens=5", "--num_samples=2", "--verbose")
    assert result.returncode == 0 and result.stdout.startswith("Once upon") and result.stdout.count("Once upon") == 2
    assert "tokens x 2" in result.stderr
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--chat", "--max_new_tokens=4",
                        stdin="hello\n/clear\nagain\n")
    assert result.returncode == 0 and "(conversation cleared)" in result.stdout
    result = run_script(ROOT / "sample.py", "--init_from=resume", "--out_dir=/nonexistent/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--raw", "--shots=2")
    assert result.returncode == 2 and "neither --chat nor --shots" in result.stderr


def test_eval_cells_follow_the_readme():
    assert grafito_eval.format_cell("what is 2+2", "what is 2+2") == "(repeats the query)"
    assert grafito_eval.format_cell("What is 2 + 2? what is 2+2", "what is 2+2") == "(repeats the query)"
    assert grafito_eval.format_cell("2+2 is a unit of measurement for the length", "what is 2+2") == "2+2 is a unit of measurement fo.."
    assert len(grafito_eval.format_cell("x" * 100, "q")) == 33
    assert grafito_eval.format_cell("a\nb | c", "q") == "a b \\| c"
    assert grafito_eval.format_cell("", "q") == ""


def test_eval_cli_writes_the_table_and_json(tiny_model_dir, tmp_path):
    import data

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
    import data
    from train import masked_val_loss

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


def test_bad_prompt_files_shots_and_eval_options_are_clear_errors(tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GrafitoError, match="not UTF-8"):
        sample.read_start(f"FILE:{binary}")
    for text, message in [('{"instruction": "q", "answer": ""}', "non-empty"), ('{"instruction": 5, "answer": 3}', "strings"),
                          ("", "no examples")]:
        (tmp_path / "shots.jsonl").write_text(text)
        with pytest.raises(GrafitoError, match=message):
            sample.load_shots(str(tmp_path / "shots.jsonl"), "unused", 0)
    with pytest.raises(GrafitoError, match="label 'x' is used twice"):
        grafito_eval.parse_models("x=out/a,x=out/b")
    with pytest.raises(GrafitoError, match="names no model source"):
        grafito_eval.parse_models("a=")
    with pytest.raises(GrafitoError, match="give the table's file name"):
        grafito_eval.prepare_out(tmp_path)
    with pytest.raises(GrafitoError, match="batch_size must be at least 1"):
        grafito_eval.check_config({**grafito_eval.DEFAULTS, "batch_size": 0})
    assert grafito_eval.contains_answer("It is 5.", "5") and not grafito_eval.contains_answer("In 1945", "5")
    assert grafito_eval.contains_answer("The answer: the Eiffel Tower!", "Eiffel tower")


def test_devices_that_are_not_here_are_clear_errors():
    from common import resolve_device

    for device, message in [("cuda:99", "cuda:99"), ("tpu", "expected auto, cpu"), ("banana", "expected auto, cpu")]:
        with pytest.raises(GrafitoError, match=message):
            resolve_device(device)
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(GrafitoError, match="no CUDA GPU"):
            resolve_device("cuda")
