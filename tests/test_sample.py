"""sample.py: answers through the engine, chat history, few-shot examples, the command line."""

import json
import subprocess
import sys

import pytest
import torch

import data
import engine
import sample
import tokenizer
from common import GrafitoError, run_cli
from conftest import ROOT
from model import GPT


def run_script(*args, stdin=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, input=stdin)


def test_the_reply_keeps_at_most_half_the_context():
    assert tokenizer.prompt_budget(120, 40) == 80
    assert tokenizer.prompt_budget(120, 500) == 60  # a long answer reserves half the context, not all of it


def test_greedy_answers_do_not_depend_on_the_seed(tiny_model_dir):
    model_engine = engine.Engine(GPT.from_pretrained(tiny_model_dir))
    prompts = [tokenizer.render_prompt([], "hello")] * 3
    answer = lambda seed: engine.answers(model_engine, prompts, 12, engine.Sampling(temperature=0),
                                         torch.Generator().manual_seed(seed))[0]
    assert answer(1) == answer(2) and len(set(answer(1))) == 1


def test_chat_keeps_history_in_the_template_and_clear_forgets(tiny_model_dir, capsys, monkeypatch):
    model_engine = engine.Engine(GPT.from_pretrained(tiny_model_dir))
    config = {**sample.DEFAULTS, "max_new_tokens": 6, "temperature": 0.0}
    seen_prompts, real = [], engine.answers

    def spy(model_engine, prompts, *args, **kwargs):
        seen_prompts.append(tokenizer.decode(prompts[0]))
        return real(model_engine, prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "answers", spy)
    history = sample.chat(model_engine, config, [], torch.Generator(),
                          lines=["first question", "second one", "/clear", "fresh start", "/quit", "never read"])
    assert seen_prompts[0] == "### Instruction: first question\n\n### Answer:"
    assert seen_prompts[1].startswith("### Instruction: first question\n\n### Answer:")
    assert seen_prompts[1].endswith("\n\n### Instruction: second one\n\n### Answer:")
    assert seen_prompts[2] == "### Instruction: fresh start\n\n### Answer:"
    assert len(seen_prompts) == 3 and len(history) <= 1 and (not history or history[0][0] == "fresh start")
    assert "(conversation cleared)" in capsys.readouterr().out


def test_shots_from_a_file(tmp_path):
    path = tmp_path / "shots.jsonl"
    path.write_text(json.dumps({"instruction": "2+2?", "answer": "4"}) + "\n\n" + json.dumps({"instruction": "3+3?", "answer": "6"}) + "\n")
    assert sample.load_shots(str(path), "", 0) == [("2+2?", "4"), ("3+3?", "6")]


def test_shots_drawn_from_a_prepared_dataset(tmp_path):
    conversations = [[("q1", "a1")], [("q2", "a2"), ("q3", "a3")], [("q4", "a4")]]
    data.write_dataset(tmp_path / "d", {"train": tokenizer.render_batch(conversations), "val": []}, {"dataset": "d"})
    drawn = sample.load_shots("2", str(tmp_path / "d"), seed=0)
    assert all(turn in [t for c in conversations for t in c] for turn in drawn) and len(drawn) >= 2
    with pytest.raises(GrafitoError, match="has only 3 conversations"):
        sample.load_shots("4", str(tmp_path / "d"), seed=0)


@pytest.mark.parametrize("text,message", [('{"instruction": "x"}', "line 1: expected a JSON object"),
                                          ('{"instruction": "q", "answer": ""}', "non-empty"),
                                          ('{"instruction": 5, "answer": 3}', "strings"), ("", "no examples"),
                                          ("[" * 100000, "line 1: expected a JSON object")])
def test_bad_shots_files_are_one_error(tmp_path, text, message):
    (tmp_path / "shots.jsonl").write_text(text)
    with pytest.raises(GrafitoError, match=message):
        sample.load_shots(str(tmp_path / "shots.jsonl"), "unused", 0)


def test_shots_that_look_like_a_number_but_are_not_digits_are_a_file_name():
    with pytest.raises(GrafitoError, match="neither a number nor a file"):
        sample.load_shots("²", "unused", 0)


def test_a_prompt_file_that_is_not_utf8_is_one_error(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GrafitoError, match="not UTF-8"):
        sample.read_start(f"FILE:{tmp_path / 'bin.txt'}")


def test_sample_answers_from_the_command_line(tiny_model_dir):
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--start=hi", "--max_new_tokens=5",
                        "--dtype=float32", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and "###" not in result.stdout


def test_sample_continues_raw_text_in_several_samples(tiny_model_dir):
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--raw", "--start=Once upon",
                        "--max_new_tokens=5", "--num_samples=2", "--verbose")
    assert result.returncode == 0 and result.stdout.startswith("Once upon") and result.stdout.count("Once upon") == 2
    assert "tokens x 2" in result.stderr


def test_sample_chats_from_a_pipe(tiny_model_dir):
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--chat", "--max_new_tokens=4",
                        stdin="hello\n/clear\nagain\n")
    assert result.returncode == 0 and "(conversation cleared)" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--init_from=resume", "--out_dir=/nonexistent/run"], "no training run in out_dir"),
    (["--raw", "--shots=2"], "neither --chat nor --shots"),
    (["--temperature=nan"], "temperature = nan is invalid"),
    (["--temperature=1e-45"], "temperature = 1e-45 is invalid"),
    (["--top_k=-1"], "top_k = -1 is invalid"),
    (["--repetition_penalty=nan"], "repetition_penalty = nan is invalid"),
    (["--seed=-1"], "seed = -1 is invalid"),
    (["--num_samples=1000000"], "num_samples = 1000000 is invalid"),
])
def test_sample_option_errors_are_one_line(tiny_model_dir, args, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--init_from={tiny_model_dir}", *args])
    with pytest.raises(SystemExit) as stop:  # in this process: run_cli is the script's whole entry point
        run_cli(sample.main)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_option_error_from_the_command_line_is_one_line_without_a_traceback(tiny_model_dir):
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--temperature=nan")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: sampling: temperature = nan is invalid")
