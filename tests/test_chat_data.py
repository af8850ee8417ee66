"""prepare/chat.py and prepare/sources.py: your own chat and preference data, in every format
and from every kind of source (files, folders, globs, a hub dataset), into the format train.py reads."""

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import COMMIT, ROOT, FakeHub

sys.path.insert(0, str(ROOT / "prepare"))

import chat  # noqa: E402
import data  # noqa: E402
import pipeline  # noqa: E402
import sources  # noqa: E402
import tokenizer  # noqa: E402
from common import GrafitoError  # noqa: E402
from pipeline import Report  # noqa: E402

# Three conversations: a system turn, two turns with right-to-left text and emoji, plain ASCII.
SYSTEM, ARABIC, EMOJI = "You are terse.", "مرحبا، كيف حالك؟", "Fine, thanks 🙂"
MESSAGES = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": ARABIC}, {"role": "assistant", "content": "بخير، شكرا"},
     {"role": "user", "content": "And in English? 👋"}, {"role": "assistant", "content": EMOJI}],
    [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue."}],
]
# what the dataset must hold for them: the template spelled out, answers between [[ ]]
EXPECTED = [
    "### Instruction: You are terse.\n\nWhat is 2+2?\n\n### Answer:[[ 4<|endoftext|>]]",
    f"### Instruction: {ARABIC}\n\n### Answer:[[ بخير، شكرا]]\n\n### Instruction: And in English? 👋\n\n"
    f"### Answer:[[ {EMOJI}<|endoftext|>]]",
    "### Instruction: Name a colour\n\n### Answer:[[ Blue.<|endoftext|>]]",
]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def run_chat(monkeypatch, *argv):
    """chat.py's main() in this process, as the command line would run it."""
    monkeypatch.setattr(sys, "argv", ["chat.py", *map(str, argv)])
    chat.main()


def shown(folder, split="train"):
    """Every conversation of a prepared split as text, its supervised spans between [[ ]]."""
    rows = data.load_split(folder, split)
    return [tokenizer.show_supervised(*rows.conversation(i), color=False) for i in range(rows.num_conversations)]


def report_of(folder):
    return json.loads((Path(folder) / "report.json").read_text())


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- every format, the same dataset

def test_every_format_gives_the_conversations_with_only_the_answers_supervised(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "messages.jsonl", [{"messages": m} for m in MESSAGES])
    sharegpt = [{"id": k, "conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in conv]}
                for k, conv in enumerate(MESSAGES)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt, ensure_ascii=False, indent=1))
    # prompt/completion in TRL's conversational form: the prompt a message list, the completion the last answer
    pq.write_table(pa.table({"prompt": [conv[:-1] for conv in MESSAGES], "completion": [conv[-1:] for conv in MESSAGES]}),
                   tmp_path / "prompt_completion.parquet")
    gz = tmp_path / "messages_gz.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "messages.jsonl").read_bytes()))
    for name, fmt in [("messages.jsonl", "messages"), ("sharegpt.json", "sharegpt"),
                      ("prompt_completion.parquet", "prompt_completion"), ("messages_gz.jsonl.gz", "messages")]:
        out = tmp_path / f"out_{name}"
        run_chat(monkeypatch, "--input", tmp_path / name, "--out_dir", out, "--val_fraction", 0)
        assert f"format {fmt} " in capsys.readouterr().out
        assert shown(out) == EXPECTED, name
        assert report_of(out)["skipped_malformed"] == {}
        assert data.load_meta(out)["source"]["format"] == fmt


def test_alpaca_and_prompt_completion_rows_with_an_input_and_a_system_column(tmp_path, monkeypatch):
    with open(tmp_path / "alpaca.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output", "system"])
        writer.writerow(["Translate to English", "שלום עולם", "Hello world", SYSTEM])
        writer.writerow(["Name a colour", "", "Blue,\nlike the sea", ""])  # a quoted answer over two lines
    run_chat(monkeypatch, "--input", tmp_path / "alpaca.csv", "--system_field", "system", "--out_dir", tmp_path / "a",
             "--val_fraction", 0)
    assert shown(tmp_path / "a") == [
        f"### Instruction: {SYSTEM}\n\nTranslate to English\n\nשלום עולם\n\n### Answer:[[ Hello world<|endoftext|>]]",
        "### Instruction: Name a colour\n\n### Answer:[[ Blue,\nlike the sea<|endoftext|>]]"]
    write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Say hi", "response": "hi 👋"}, {"prompt": "Say bye", "response": "bye"}])
    run_chat(monkeypatch, "--input", tmp_path / "pr.jsonl", "--out_dir", tmp_path / "pr", "--val_fraction", 0)
    assert shown(tmp_path / "pr") == ["### Instruction: Say hi\n\n### Answer:[[ hi 👋<|endoftext|>]]",
                                      "### Instruction: Say bye\n\n### Answer:[[ bye<|endoftext|>]]"]


def test_columns_named_by_options(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "reply": "Because.", "persona": SYSTEM}])
    run_chat(monkeypatch, "--input", tmp_path / "qa.jsonl", "--instruction_field", "question", "--answer_field", "reply",
             "--system_field", "persona", "--out_dir", tmp_path / "qa", "--val_fraction", 0)
    assert "format alpaca (instruction <- 'question'" in capsys.readouterr().out
    assert shown(tmp_path / "qa") == [f"### Instruction: {SYSTEM}\n\nWhy?\n\n### Answer:[[ Because.<|endoftext|>]]"]
    write_jsonl(tmp_path / "dialog.jsonl", [{"dialog": MESSAGES[2]}])
    run_chat(monkeypatch, "--input", tmp_path / "dialog.jsonl", "--messages_field", "dialog", "--out_dir", tmp_path / "d",
             "--val_fraction", 0)
    assert shown(tmp_path / "d") == [EXPECTED[2]]


# ----------------------------------------------------------------------------- rows that do not fit

BAD_ROWS = [  # (the row, the skip it must be counted as); line k + 1 of the file
    ({"messages": MESSAGES[2]}, None),
    ("{not json", "bad_json"),
    ('["a list", "not an object"]', "not_an_object"),
    ({"text": "no messages column"}, "missing_field"),
    ({"messages": "a string, not a list"}, "not_a_message_list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles_out_of_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
                   {"role": "assistant", "content": "c"}]}, "roles_out_of_order"),
    ({"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles_out_of_order"),
    ({"messages": [{"role": "user", "content": "weather?"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]}, "tool_call"),
    ({"messages": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"},
                   {"role": "assistant", "content": "Sunny."}]}, "tool_call"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}}]},
                   {"role": "assistant", "content": "A cat."}]}, "non_text_content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty_message"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "hello"}]}, "empty_message"),
    ({"messages": [{"role": "narrator", "content": "once"}, {"role": "assistant", "content": "upon"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "anyone?"}]}, "no_answer"),
    ({"messages": [{"role": "user", "content": "Two parts"},
                   {"role": "assistant", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]},
     None),  # text parts are text
]


def test_every_kind_of_bad_row_is_a_counted_skip_with_its_line(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])
    with open(path, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')  # Latin-1, not UTF-8
    run_chat(monkeypatch, "--input", path, "--out_dir", tmp_path / "out", "--val_fraction", 0)
    report = report_of(tmp_path / "out")
    expected = {}
    for line, (_, reason) in enumerate(BAD_ROWS, start=1):
        if reason:
            expected.setdefault(reason, []).append(line)
    expected["invalid_utf8"] = [len(BAD_ROWS) + 1]
    assert report["skipped_malformed"] == {reason: len(lines) for reason, lines in expected.items()}
    assert {reason: report["first_lines"][reason] for reason in expected} == expected
    assert report["records_read"] == len(BAD_ROWS) + 1
    assert shown(tmp_path / "out") == [EXPECTED[2], "### Instruction: Two parts\n\n### Answer:[[ one\ntwo<|endoftext|>]]"]
    monkeypatch.setattr(sys, "argv", ["chat.py", "--input", str(path), "--out_dir", str(tmp_path / "strict"), "--strict"])
    with pytest.raises(GrafitoError, match=r"bad\.jsonl, line 2: bad json"):
        chat.main()
    assert not (tmp_path / "strict").exists()


def test_an_unanswered_last_message_is_removed_and_counted(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "open.jsonl", [{"messages": MESSAGES[2] + [{"role": "user", "content": "and another?"}]}])
    run_chat(monkeypatch, "--input", tmp_path / "open.jsonl", "--out_dir", tmp_path / "o", "--val_fraction", 0)
    assert shown(tmp_path / "o") == [EXPECTED[2]]
    assert report_of(tmp_path / "o")["repaired"] == {"unanswered_last_message_removed": 1}


def test_formats_that_cannot_be_told_and_empty_results_say_why(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "odd.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(GrafitoError, match=r"(?s)cannot tell the format.*messages, sharegpt, alpaca, prompt_completion"
                                           r".*--instruction_field.*keys of the first 1 rows: q, a"):
        run_chat(monkeypatch, "--input", tmp_path / "odd.jsonl", "--out_dir", tmp_path / "o")
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    for fmt in (["--format", "alpaca"], []):  # preference data without --pairs: the error says so
        with pytest.raises(GrafitoError, match=r"look like preference pairs: add --pairs"):
            run_chat(monkeypatch, "--input", tmp_path / "prefs.jsonl", *fmt, "--out_dir", tmp_path / "o")
    with pytest.raises(GrafitoError, match=r"--pairs reads TRL's preference format.*keys of the first 1 rows: messages"):
        write_jsonl(tmp_path / "m.jsonl", [{"messages": MESSAGES[0]}])
        run_chat(monkeypatch, "--pairs", "--input", tmp_path / "m.jsonl", "--out_dir", tmp_path / "o")
    (tmp_path / "garbled.jsonl").write_text("{oops\n[1,\n")
    with pytest.raises(GrafitoError, match="none of its 2 records can be read"):
        run_chat(monkeypatch, "--input", tmp_path / "garbled.jsonl", "--out_dir", tmp_path / "o")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(GrafitoError, match="no records"):
        run_chat(monkeypatch, "--input", tmp_path / "empty.jsonl", "--out_dir", tmp_path / "o")
    write_jsonl(tmp_path / "tools.jsonl", [BAD_ROWS[8][0], BAD_ROWS[9][0]])
    with pytest.raises(GrafitoError, match=r"no conversation is left for the train split \(2 records read; tool call 2\)"):
        run_chat(monkeypatch, "--input", tmp_path / "tools.jsonl", "--out_dir", tmp_path / "o")
    with pytest.raises(GrafitoError, match="--chosen_field does not apply without --pairs"):
        run_chat(monkeypatch, "--input", tmp_path / "m.jsonl", "--chosen_field", "x")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- sources: several files, readers

def test_folders_globs_and_several_files_number_rows_by_file(tmp_path, monkeypatch):
    folder = tmp_path / "exports"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"messages": MESSAGES[0]}, "{broken"])
    write_jsonl(folder / "b" / "c.jsonl", ["{broken", {"messages": MESSAGES[2]}])
    (folder / "notes.md").write_text("not data")
    for source in ([folder], [folder / "*.jsonl", folder / "b" / "*.jsonl"], [folder / "a.jsonl", folder / "b" / "c.jsonl"]):
        out = tmp_path / "out"
        run_chat(monkeypatch, "--input", *source, "--out_dir", out, "--val_fraction", 0)
        assert shown(out) == [EXPECTED[0], EXPECTED[2]]
        assert report_of(out)["first_lines"]["bad_json"] == ["a.jsonl:2", "b/c.jsonl:1"]
    assert chat.dataset_name([str(folder / "a.jsonl.gz")], False) == "a"
    assert chat.dataset_name(["hub:Org/My-Chats@v2"], True) == "my_chats_pairs"
    with pytest.raises(GrafitoError, match="no such file or folder"):
        sources.resolve([str(tmp_path / "missing.jsonl")])
    with pytest.raises(GrafitoError, match="unknown format"):
        sources.resolve([str(folder / "notes.md")])
    with pytest.raises(GrafitoError, match="--split and --subset choose the files of a hub dataset"):
        sources.resolve([str(folder)], split="train")


def rows_of(path, **kwargs):
    report = Report(str(path))
    return list(sources.read_file(path, report, **kwargs)), report


def test_each_reader_numbers_rows_where_they_start(tmp_path):
    items = [{"a": 1}, {"a": "two\nlines"}, {"a": [3]}]
    (tmp_path / "list.json").write_text('[\n  {"a": 1},\n\n  {"a": "two\\nlines"},\n  {"a": [\n    3\n  ]}\n]\n')
    assert rows_of(tmp_path / "list.json")[0] == [(2, items[0]), (4, items[1]), (5, items[2])]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(i) for i in items))  # JSON lines in a .json file
    assert rows_of(tmp_path / "lines.json")[0] == list(zip([1, 2, 3], items))
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"a": 2}\n {"a": 3}]')
    with pytest.raises(GrafitoError, match=r"broken\.json, line 3: expected ','"):
        rows_of(tmp_path / "broken.json")
    (tmp_path / "t.csv").write_text('k,v\n1,"x\ny"\n\n2,z\n3\n')
    rows, report = rows_of(tmp_path / "t.csv")
    assert rows == [(2, {"k": "1", "v": "x\ny"}), (5, {"k": "2", "v": "z"})]
    assert report.skipped == {"wrong_number_of_fields": 1} and report.lines["wrong_number_of_fields"] == [6]
    pq.write_table(pa.table({"k": list(range(2500)), "v": ["x"] * 2500}), tmp_path / "t.parquet", row_group_size=1000)
    rows, report = rows_of(tmp_path / "t.parquet", columns=["k", "absent"])
    assert rows == [(k + 1, {"k": k}) for k in range(2500)] and report.read == 2500  # only the columns asked for
    (tmp_path / "doc.txt").write_text("a whole\ndocument")
    assert rows_of(tmp_path / "doc.txt")[0] == [(1, {"text": "a whole\ndocument"})]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(GrafitoError, match="not a Parquet file"):
        rows_of(tmp_path / "bad.parquet")


def test_work_is_done_a_few_chunks_ahead_of_the_writer(monkeypatch):
    monkeypatch.setattr(pipeline, "INLINE_CHUNKS", 3)
    pulled = []

    def chunks():
        for k in range(40):
            pulled.append(k)
            yield [0] * k

    results = []
    for k, length in enumerate(pipeline.ordered_map(len, chunks(), 2)):  # len: a function worker processes can run
        results.append(length)
        assert len(pulled) <= k + 2 * 2 + 1  # the chunks in flight, never the whole input
    assert results == list(range(40))


def test_worker_processes_write_the_same_dataset(tmp_path, monkeypatch):
    words = ["alpha", "beta", "gamma", "delta", "ünïcödé", "🙂", "שלום"]
    rows = [{"messages": [{"role": "user", "content": f"question {k} {words[k % 7]}"},
                          {"role": "assistant", "content": " ".join(words[: 1 + k % 7] * (1 + k % 30))}]}
            for k in range(300)]
    rows += rows[:20]  # duplicates, found across chunks
    write_jsonl(tmp_path / "many.jsonl", rows)
    monkeypatch.setattr(pipeline, "CHUNK", 16)
    monkeypatch.setattr(pipeline, "INLINE_CHUNKS", 2)
    for workers in (1, 2):
        run_chat(monkeypatch, "--input", tmp_path / "many.jsonl", "--out_dir", tmp_path / f"w{workers}", "--workers",
                 workers, "--block_size", 64)
    for name in ("train.bin", "train.mask.bin", "train.offsets.bin", "val.bin", "val.mask.bin", "val.offsets.bin"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    one, two = report_of(tmp_path / "w1"), report_of(tmp_path / "w2")
    assert one["dropped"] == two["dropped"] and one["first_lines"] == two["first_lines"]
    assert one["dropped"]["duplicate_exact"] == 20 and one["dropped"]["longer_than_block_size"] > 0


# ----------------------------------------------------------------------------- --pairs

def test_pairs_as_strings_and_as_message_lists(tmp_path, monkeypatch, capsys):
    question = [{"role": "user", "content": "Capital of France? 🇫🇷"}]
    write_jsonl(tmp_path / "strings.jsonl", [
        {"prompt": "Capital of France? 🇫🇷", "chosen": "Paris.", "rejected": "London."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "yes"},  # no preference: dropped
        {"prompt": "No answer", "chosen": "", "rejected": "b"},  # an empty message
    ])
    pq.write_table(pa.table({  # explicit: prompt and answers as message lists, a system turn, two turns
        "prompt": [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "مرحبا"}]],
        "chosen": [[{"role": "assistant", "content": "أهلا"}]], "rejected": [[{"role": "assistant", "content": "no"}]],
    }), tmp_path / "explicit.parquet")
    write_jsonl(tmp_path / "implicit.jsonl", [  # no prompt: whole conversations, the prompt before the last answer
        {"chosen": question + [{"role": "assistant", "content": "Paris."}],
         "rejected": question + [{"role": "assistant", "content": "Rome."}]},
        {"chosen": question + [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "user", "content": "Something else"}, {"role": "assistant", "content": "Rome."}]},
        {"chosen": question + [{"role": "assistant", "content": "Paris."}], "rejected": question},
    ])
    expected = {
        "strings.jsonl": [("### Instruction: Capital of France? 🇫🇷\n\n### Answer:", " Paris.", " London.")],
        "explicit.parquet": [(f"### Instruction: {SYSTEM}\n\nhi\n\n### Answer: hello\n\n### Instruction: مرحبا\n\n"
                              f"### Answer:", " أهلا", " no")],
        "implicit.jsonl": [("### Instruction: Capital of France? 🇫🇷\n\n### Answer:", " Paris.", " Rome.")],
    }
    skipped = {"strings.jsonl": {"empty_message": 1}, "explicit.parquet": {},
               "implicit.jsonl": {"chosen_and_rejected_differ_before_last_answer": 1, "no_answer": 1}}
    for name, pairs in expected.items():
        out = tmp_path / f"pairs_{name}"
        run_chat(monkeypatch, "--pairs", "--input", tmp_path / name, "--out_dir", out, "--val_fraction", 0)
        assert "format pairs" in capsys.readouterr().out
        split = data.load_pairs(out, "train")
        got = []
        for i in range(split.num_pairs):
            chosen, chosen_mask, rejected, rejected_mask = split.pair(i)
            n = int(split.prompt_lengths[i])
            assert chosen[:n] == rejected[:n] and chosen_mask == [0] * n + [1] * (len(chosen) - n)
            got.append((tokenizer.decode(chosen[:n]), tokenizer.decode(chosen[n:-1]), tokenizer.decode(rejected[n:-1])))
        assert got == pairs, name
        assert report_of(out)["skipped_malformed"] == skipped[name]
    assert report_of(tmp_path / "pairs_strings.jsonl")["dropped"] == {"same_answers_up_to_case_or_punctuation": 1}
    assert data.load_meta(tmp_path / "pairs_strings.jsonl")["kind"] == "pairs"
    write_jsonl(tmp_path / "transcripts.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}])
    with pytest.raises(GrafitoError, match="prepare/hh_rlhf.py --pairs"):
        run_chat(monkeypatch, "--pairs", "--input", tmp_path / "transcripts.jsonl", "--out_dir", tmp_path / "t")


# ----------------------------------------------------------------------------- a hub dataset, through a local stand-in (conftest)

def chat_script(args, env):
    return subprocess.run([sys.executable, str(ROOT / "prepare" / "chat.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_hub_dataset_is_read_shard_by_shard_through_huggingface_hub(tmp_path, fake_hub):
    repo = tmp_path / "served"
    (repo / "data").mkdir(parents=True)
    shards = [MESSAGES[:2], MESSAGES[2:], [[{"role": "user", "content": "test split"}, {"role": "assistant", "content": "x"}]]]
    names = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"]
    for name, conversations in zip(names, shards):
        pq.write_table(pa.table({"messages": conversations}), repo / name)
    FakeHub.repos = {"someone/chats": repo}
    result = chat_script(["--input", "hub:someone/chats", "--out_dir", tmp_path / "hub", "--val_fraction", 0], fake_hub)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shown(tmp_path / "hub") == EXPECTED  # both train shards, in order; not the test split
    assert data.load_meta(tmp_path / "hub")["source"]["files"] == names[:2]
    assert data.load_meta(tmp_path / "hub")["source"]["commit"] == COMMIT
    assert report_of(tmp_path / "hub")["source"] == "hub:someone/chats (split train)"
    cached = list((tmp_path / "hf_home").rglob("train-0000*-of-00002.parquet"))
    assert len(cached) == 2 and not list((tmp_path / "hf_home").rglob("test-*"))  # in huggingface_hub's cache
    missing = chat_script(["--input", "hub:someone/other", "--out_dir", tmp_path / "x"], fake_hub)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_a_hub_dataset_card_names_the_files_of_each_subset_and_split(tmp_path, fake_hub):
    repo = tmp_path / "served"
    (repo / "sft").mkdir(parents=True)
    (repo / "prefs").mkdir()
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: sft\n  data_files:\n  - split: train_sft\n"
                                    "    path: sft/train_sft-*\n- config_name: prefs\n  default: true\n  data_files:\n"
                                    "  - split: train\n    path: prefs/*.jsonl\n---\n# A card\n")
    pq.write_table(pa.table({"messages": MESSAGES[2:]}), repo / "sft" / "train_sft-00000.parquet")
    pq.write_table(pa.table({"messages": MESSAGES[:1]}), repo / "sft" / "test_sft-00000.parquet")
    write_jsonl(repo / "prefs" / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    FakeHub.repos = {"someone/mixed": repo}
    result = chat_script(["--input", "hub:someone/mixed@v1", "--subset", "sft", "--split", "train_sft",
                          "--out_dir", tmp_path / "sft", "--val_fraction", 0], fake_hub)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shown(tmp_path / "sft") == [EXPECTED[2]]
    assert data.load_meta(tmp_path / "sft")["source"]["revision"] == "v1"
    result = chat_script(["--pairs", "--input", "hub:someone/mixed", "--out_dir", tmp_path / "p", "--val_fraction", 0],
                         fake_hub)  # the default subset, split train
    assert result.returncode == 0, result.stderr[-3000:]
    assert data.load_pairs(tmp_path / "p", "train").num_pairs == 1


def test_offline_a_hub_dataset_is_one_error_naming_the_local_alternative():
    # HF_HUB_OFFLINE=1 (conftest): listing a dataset needs the hub
    with pytest.raises(GrafitoError, match=r"unreachable \(offline, or HF_HUB_OFFLINE=1\)\. Offline, pass a local copy "
                                           r"with --input PATH"):
        sources.resolve(["hub:someone/chats"])


def test_split_files_by_card_or_by_name():
    files = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/validation.jsonl",
             "en/test/0000.parquet", "en/train/0000.parquet"]
    assert sources.split_files(files[:3], None, "train", None, "x") == files[:2]
    assert sources.split_files(files, None, "validation", None, "x") == ["data/validation.jsonl"]
    assert sources.split_files(files, None, "train", "en", "x") == ["en/train/0000.parquet"]
    assert sources.split_files(["a.jsonl", "b.jsonl"], None, "train", None, "x") == ["a.jsonl", "b.jsonl"]
    configs = [{"config_name": "en", "data_files": "en/**/*.parquet"},
               {"config_name": "all", "data_files": {"train": ["data/train-*"], "eval": "data/validation.jsonl"}}]
    assert sources.split_files(files, configs, "train", "en", "x") == ["en/test/0000.parquet", "en/train/0000.parquet"]
    assert sources.split_files(files, configs, "eval", "all", "x") == ["data/validation.jsonl"]
    with pytest.raises(GrafitoError, match="several subsets and none is the default; choose one with --subset: en, all"):
        sources.split_files(files, configs, "train", None, "x")
    with pytest.raises(GrafitoError, match="no data files for split 'test'"):
        sources.split_files(files[:3], None, "test", None, "x")
    with pytest.raises(GrafitoError, match="subset 'all' has no split 'test'; its splits: train, eval"):
        sources.split_files(files, configs, "test", "all", "x")
