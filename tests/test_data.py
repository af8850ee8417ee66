"""prepare/: parsing real and synthetic sources, cleaning, masks, the bin format, bad input."""

import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import GRAFITO_25K, HH_RLHF_TEST, ROOT, needs_shared

sys.path.insert(0, str(ROOT / "prepare"))

import data  # noqa: E402
import dolly  # noqa: E402
import grafito25k  # noqa: E402
import hh_rlhf  # noqa: E402
import pipeline  # noqa: E402
import sources  # noqa: E402
import tokenizer  # noqa: E402
from common import GrafitoError  # noqa: E402
from pipeline import Record, Report  # noqa: E402


def read_records(path, report, keys):
    return list(pipeline.read_records(path, report, keys))


def args_for(out_dir, block_size=1024, **extra):
    p = pipeline.parser("test", "test", block_size)
    ns = p.parse_args(["--out_dir", str(out_dir)])
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def supervised_texts(ids, mask):
    """Decoded supervised spans, end-of-text removed."""
    spans, current = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(t)
        elif current:
            spans.append(tokenizer.decode([x for x in current if x != tokenizer.EOT]))
            current = []
    return spans


# ----------------------------------------------------------------------------- grafito-25k (real file)

@needs_shared
def test_grafito_parses_every_sample_with_its_turns_together():
    text = GRAFITO_25K.read_text(encoding="utf-8")
    blocks = text.split("\n\n\n")  # independent of the parser: samples end at two blank lines
    line_start_instructions = len(re.findall(r"(?m)^### Instruction:", text))
    line_start_answers = len(re.findall(r"(?m)^### Answer:", text))
    # the one sample with two answers in a row (a leaked 'human:' turn) cannot be a conversation
    non_alternating = [b for b in blocks if re.search(r"(?m)^### Answer:(?:(?!^### Instruction:).)*^### Answer:", b, re.S | re.M)]
    assert len(non_alternating) == 1
    report = Report("grafito-25k")
    records = grafito25k.parse(text, report)
    assert report.read == len(blocks) == 24127
    assert len(records) == len(blocks) - 1
    assert report.skipped == {"turns_do_not_alternate": 1}
    assert sum(len(r.turns) for r in records) == line_start_instructions - 1  # 24,694 - 1
    assert line_start_answers - 2 == sum(len(r.turns) for r in records)
    multi = [r for r in records if len(r.turns) > 1]
    assert len(multi) == sum(1 for b in blocks if len(re.findall(r"(?m)^### Instruction:", b)) > 1)
    # '### Answer: ### Instruction: text' is repaired to the text, never kept as a marker
    assert report.repaired["answer_began_with_instruction_marker"] == text.count("### Answer: ### Instruction:")
    assert not any(a.startswith("### Instruction:") for r in records for _, a in r.turns)


@needs_shared
def test_grafito_masks_supervise_exactly_the_cleaned_answers(tmp_path):
    report = Report("grafito-25k")
    records = grafito25k.parse(GRAFITO_25K.read_text(encoding="utf-8"), report)
    kept = pipeline.clean_records(records, report, detokenize=True, check_context=True)
    assert not any("### " in text for r in kept for turn in r.turns for text in turn)  # no template marker survives
    for record, ids, mask in pipeline.tokenize(kept, 1024, "truncate", report):
        assert supervised_texts(ids, mask) == [" " + a for _, a in record.turns]
        assert ids[-1] == tokenizer.EOT and mask[-1] == 1


@needs_shared
def test_grafito_script_writes_the_format_and_report(tmp_path):
    out = tmp_path / "g"
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "grafito25k.py"), "--input", str(GRAFITO_25K),
                             "--out_dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    meta = data.load_meta(out)
    report = json.loads((out / "report.json").read_text())
    assert meta["source"]["sha256"] == grafito25k.SHA256
    assert report["records_read"] == 24127
    assert report["conversations"] == meta["splits"]["train"]["conversations"] + meta["splits"]["val"]["conversations"]
    assert report["dropped"]["duplicate_exact"] >= 5 and report["dropped"]["empty_answer"] >= 46
    train = data.load_split(out, "train")
    assert train.tokens.dtype == np.uint16 and train.mask.dtype == np.uint8
    assert len(train.tokens) == len(train.mask) == train.offsets[-1]
    ends = train.offsets[1:] - 1
    assert (train.tokens[ends] == tokenizer.EOT).all() and (train.mask[ends] == 1).all()
    assert (train.tokens[train.offsets[:-1]] == tokenizer.encode("###")[0]).all()  # every conversation starts a prompt
    assert (train.mask[train.offsets[:-1]] == 0).all()
    assert "kept" in result.stdout and "in " in result.stdout


# ----------------------------------------------------------------------------- hh-rlhf (real split)

@needs_shared
def test_hh_rlhf_reads_every_record_and_supervises_only_assistant_text():
    report = Report(str(HH_RLHF_TEST))
    rows = read_records(HH_RLHF_TEST, report, ["chosen"])
    assert report.read == len(rows) == 2312
    records = list(hh_rlhf.parse(rows, report, "chosen"))
    assert len(records) + sum(report.skipped.values()) == 2312
    kept = pipeline.clean_records(records, report)
    by_line = {line: obj["chosen"] for line, obj in rows}
    checked = 0
    for record, ids, mask in pipeline.tokenize(kept, 512, "truncate", report):
        raw = by_line[record.line]
        human = [pipeline.normalize_whitespace(t) for t in re.findall(r"\n\nHuman:(.*?)(?=\n\nAssistant:)", raw, re.S)]
        spans = supervised_texts(ids, mask)
        assert spans == [" " + a for _, a in record.turns]
        prompts = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
        for h in human[:len(record.turns)]:  # every Human turn sits in the unsupervised prompt text
            assert f"### Instruction: {h}\n\n### Answer:" in prompts
        checked += 1
    assert checked > 2000


def test_hh_rlhf_turns_map_and_bad_transcripts_are_counted():
    rows = [(1, {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"}),
            (2, {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c"}),
            (3, {"chosen": "preamble\n\nHuman: a\n\nAssistant: b"})]
    report = Report("x")
    records = list(hh_rlhf.parse(rows, report, "chosen"))
    assert [r.turns for r in records] == [[(" hi", " hello"), (" bye", " see you")]]
    assert report.skipped == {"turns_do_not_alternate": 1, "text_before_first_turn": 1}
    with pytest.raises(GrafitoError, match="line 2: turns do not alternate"):
        list(hh_rlhf.parse(rows, Report("x", strict=True), "chosen"))


# ----------------------------------------------------------------------------- dolly (synthetic file)

def write_jsonl(path, lines, compress=False):
    text = "\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n"
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def dolly_row(instruction, response, context="", category="open_qa"):
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def test_dolly_subset_context_duplicates_and_bad_lines(tmp_path):
    rows = [
        dolly_row("What is the capital of France?", "Paris."),
        dolly_row("What is the capital of France?", "Paris."),  # exact duplicate
        dolly_row("what is the capital of france", "paris"),  # normalised duplicate
        dolly_row("Given this paragraph, when was X founded?", "In 1901.", context="X was founded in 1901 by Y.",
                  category="closed_qa"),
        dolly_row("Given this paragraph, who founded Z?", "Ada.", category="closed_qa"),  # context missing
        dolly_row("Write a poem about the sea", "waves " * 40, category="creative_writing"),  # too long
        dolly_row("Name a colour", "Blue", category="brainstorming"),
        "{not json",
        {"instruction": "no response key", "context": "", "category": "open_qa"},
    ]
    path = write_jsonl(tmp_path / "dolly.jsonl", rows)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "dolly.py"), "--input", str(path), "--out_dir", str(out),
                             "--val_fraction", "0"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["records_read"] == 9
    assert report["skipped_malformed"] == {"bad_json": 1, "missing_key": 1}
    assert report["first_lines"]["bad_json"] == [8]
    assert report["dropped"] == {"duplicate_exact": 1, "duplicate_normalized": 1, "instruction_refers_to_missing_text": 1,
                                 "response_longer_than_max": 1}
    train = data.load_split(out, "train")
    texts = [tokenizer.decode(train.conversation(i)[0]) for i in range(train.num_conversations)]
    assert texts[1] == ("### Instruction: Given this paragraph, when was X founded?\n\nContext: X was founded in 1901 by Y."
                        "\n\n### Answer: In 1901.<|endoftext|>")
    assert len(texts) == 3


def test_a_prepare_run_that_keeps_nothing_leaves_the_old_dataset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [dolly_row("A question?", "An answer here.", category="open_qa"),
                                               dolly_row("B question?", "Another answer.", category="open_qa")])
    out = tmp_path / "out"
    script = [sys.executable, str(ROOT / "prepare" / "dolly.py"), "--input", str(path), "--out_dir", str(out)]
    assert subprocess.run(script + ["--val_fraction", "0"], capture_output=True, text=True).returncode == 0
    before = (out / "train.bin").read_bytes()
    result = subprocess.run(script + ["--max_response_chars", "3"], capture_output=True, text=True)
    assert result.returncode == 2 and "no conversation is left" in result.stderr and "response longer than max 2" in result.stderr
    assert (out / "train.bin").read_bytes() == before
    result = subprocess.run(script + ["--max_response_chars", "-1"], capture_output=True, text=True)
    assert result.returncode == 2 and "max_response_chars = -1 is invalid" in result.stderr


def test_dolly_category_filter_and_unknown_category(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [dolly_row("A?", "a", category="open_qa"),
                                               dolly_row("B?", "b", category="classification")])
    report = Report("d")
    records = list(dolly.select(read_records(path, report, dolly.KEYS), report, ["classification"], 84, "keep"))
    assert [r.turns[0][0] for r in records] == ["B?"] and report.dropped == {"category_not_selected": 1}
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "dolly.py"), "--input", str(path),
                             "--categories", "poetry"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "unknown poetry" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- bad input

def test_truncated_gzip_empty_file_and_wrong_schema_are_clear_errors(tmp_path):
    full = write_jsonl(tmp_path / "full.jsonl.gz", [{"chosen": "\n\nHuman: a\n\nAssistant: b"}] * 2000, compress=True)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full.read_bytes()[:-30])
    with pytest.raises(GrafitoError, match="truncated"):
        read_records(cut, Report("cut"), ["chosen"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(GrafitoError, match="empty file"):
        read_records(empty, Report("empty"), ["chosen"])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    with pytest.raises(GrafitoError, match="none of 2 records has the fields chosen"):
        read_records(wrong, Report("wrong"), ["chosen"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "x"}, "{oops", {"chosen": "y"}])
    report = Report("bad")
    assert len(read_records(bad, report, ["chosen"])) == 2 and report.skipped == {"bad_json": 1}
    with pytest.raises(GrafitoError, match=r"line 2: bad json"):
        read_records(bad, Report("bad", strict=True), ["chosen"])


def test_scripts_offline_name_the_input_option(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "HOME": str(tmp_path)}
    for script in ("hh_rlhf.py", "dolly.py"):
        result = subprocess.run([sys.executable, str(ROOT / "prepare" / script), "--out_dir", str(tmp_path / "o")],
                                capture_output=True, text=True, cwd=ROOT, env=env)
        assert result.returncode == 2
        assert "--input PATH" in result.stderr and "Traceback" not in result.stderr


def test_grafito_download_path_checks_the_pinned_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOWNLOAD_CACHE", tmp_path / "cache")
    source = tmp_path / "grafito-25k"
    source.write_text("### Instruction: a\n\n### Answer: b\n")
    good = sources.sha256_of(source)
    path = sources.fetch_url(source.as_uri(), good, "g")
    assert path.read_text() == source.read_text()
    with pytest.raises(GrafitoError, match="does not match the pinned"):
        sources.fetch_url(source.as_uri(), "0" * 64, "other")
    with pytest.raises(GrafitoError, match="--input PATH"):
        sources.fetch_url((tmp_path / "missing").as_uri(), good, "missing")

    class DroppedConnection:  # the server closes the connection before Content-Length bytes came
        headers = {"Content-Length": "100"}
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def read(self, n):
            import http.client
            raise http.client.IncompleteRead(b"partial", 93)

    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda *a, **k: DroppedConnection())
    with pytest.raises(GrafitoError, match="IncompleteRead.*--input PATH"):
        sources.fetch_url("https://example.invalid/g", good, "dropped")
    assert not list((tmp_path / "cache").glob("dropped*"))  # no partial file left behind


def test_grafito_malformed_samples_are_counted_or_stop_with_strict():
    text = ("### Instruction: q1\n\n### Answer: a1\n\n\n"
            "### Instruction: only a question\n\n\n"
            "stray text\n\n\n"
            "### Instruction: q2\n\n### Answer: line one\nline two\n\n### Instruction: q3\n\n### Answer: a3\n\n\n"
            "### Instruction: q4\n\n### Answer: a4\n\n### Instruction: left open\n\n\n"
            "### Answer: ### Instruction: x\n\n### Answer: a5\n")  # repairable, but answers first: skipped only
    report = Report("g")
    records = grafito25k.parse(text, report)
    assert [r.turns for r in records] == [[("q1", "a1")], [("q2", "line one\nline two"), ("q3", "a3")], [("q4", "a4")]]
    assert [r.line for r in records] == [1, 12, 22]
    assert report.skipped == {"instruction_without_answer": 1, "text_outside_a_turn": 1, "turns_do_not_alternate": 1}
    assert report.repaired == {"unanswered_last_instruction_removed": 1}
    assert report.lines["instruction_without_answer"] == [6]
    with pytest.raises(GrafitoError, match="line 6: instruction without answer"):
        grafito25k.parse(text, Report("g", strict=True))


# ----------------------------------------------------------------------------- cleaning and format

def test_cleaning_repairs_text():
    assert pipeline.repair_mojibake("videogaÃƒÂ±ame") == "videogañame"  # double mojibake, from the original README
    assert pipeline.repair_mojibake("Iâ€™m") == "I’m"
    assert pipeline.repair_mojibake("naïve café") == "naïve café"
    assert pipeline.normalize_whitespace("a\u00a0b\u200b  c \n\n\n\n    code()  \r\n") == "a b c\n\n    code()"
    assert pipeline.detokenize_ptb("`` Ring of Fire '' ( 13.24 ) , by Cash 's band") == '"Ring of Fire" (13.24), by Cash\'s band'
    assert pipeline.missing_context("Given this paragraph about London, when was it founded?")
    assert not pipeline.missing_context("Given this paragraph, when was it founded?\n\nContext: London was founded in 47 AD.")
    assert not pipeline.missing_context("who supported the passage of the indian removal act")


def test_cleaning_drops_by_reason():
    records = [Record(1, [("Q?", "Q?")]), Record(2, [("Q?", "  ")]), Record(3, [("Q?", ")")]),
               Record(4, [("Q?", "fine\n\nHuman: leaked")]), Record(5, [("Q?", "A"), ("R?", " ")]), Record(6, [("other", "thing")])]
    report = Report("x")
    kept = pipeline.clean_records(records, report)
    assert [r.line for r in kept] == [5, 6] and kept[0].turns == [("Q?", "A")]
    assert report.dropped == {"answer_repeats_instruction": 1, "empty_answer": 1, "answer_without_words": 1,
                              "role_marker_inside_text": 1}
    assert report.repaired["empty_last_answer_removed"] == 1


def test_overlong_conversations_truncate_at_a_turn_or_drop():
    long_answer = "word " * 60
    records = [Record(1, [("a", "short"), ("b", long_answer)]), Record(2, [("c", long_answer)])]
    report = Report("x")
    out = pipeline.tokenize(records, 40, "truncate", report)
    assert [(r.line, len(r.turns)) for r, _, _ in out] == [(1, 1)] and len(out[0][1]) <= 40
    assert report.dropped == {"longer_than_block_size": 1}
    assert pipeline.tokenize(records, 40, "drop", Report("y")) == []


def test_val_split_is_stable_when_data_is_added():
    turns = [[(f"question {i}", f"answer {i}")] for i in range(400)]
    first = [pipeline.in_val(t, 0.1, 1337) for t in turns]
    assert 15 < sum(first) < 65
    assert first == [pipeline.in_val(t, 0.1, 1337) for t in turns]
    assert first != [pipeline.in_val(t, 0.1, 7) for t in turns]


def test_rewrite_is_atomic_and_token_ids_must_fit_uint16(tmp_path):
    conv = tokenizer.render([("q", "a")])
    data.write_dataset(tmp_path / "d", {"train": [conv], "val": []}, {"dataset": "t"})
    before = (tmp_path / "d" / "train.bin").read_bytes()
    with pytest.raises(GrafitoError, match="uint16"):
        data.write_dataset(tmp_path / "d", {"train": [([70000], [1])], "val": []}, {"dataset": "t"})
    assert (tmp_path / "d" / "train.bin").read_bytes() == before  # the failed rewrite left the old files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    split = data.load_split(tmp_path / "d", "train")
    assert split.conversation(0) == conv
    (tmp_path / "d" / "train.mask.bin").write_bytes(b"\x01")
    with pytest.raises(GrafitoError, match="disagree with meta.json"):
        data.load_split(tmp_path / "d", "train")
    good_offsets = (tmp_path / "d" / "train.offsets.bin").read_bytes()
    for damaged in [b"", good_offsets + b"\x00", good_offsets[:8] + good_offsets]:  # empty, a stray byte, one too many
        (tmp_path / "d" / "train.offsets.bin").write_bytes(damaged)
        with pytest.raises(GrafitoError, match="train.offsets.bin is damaged"):
            data.load_split(tmp_path / "d", "train")
    data.write_dataset(tmp_path / "d3", {"train": [conv] * 3, "val": []}, {"dataset": "t"})
    offsets = np.fromfile(tmp_path / "d3" / "train.offsets.bin", dtype=np.int64)
    offsets[1], offsets[2] = offsets[2], offsets[1]  # the right count and end, but out of order
    offsets.tofile(tmp_path / "d3" / "train.offsets.bin")
    with pytest.raises(GrafitoError, match="train.offsets.bin is damaged"):
        data.load_split(tmp_path / "d3", "train")
    (tmp_path / "d" / "meta.json").write_text("{ not json")
    with pytest.raises(GrafitoError, match="meta.json is unreadable"):
        data.load_split(tmp_path / "d", "train")
    with pytest.raises(GrafitoError, match="prepare script first"):
        data.resolve_dataset(tmp_path / "nothing")


def test_prepare_never_replaces_a_folder_that_is_not_a_dataset(tmp_path):
    conv = tokenizer.render([("q", "a")])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("months of work")
    with pytest.raises(GrafitoError, match="not a prepared dataset"):
        data.write_dataset(tmp_path / "notes", {"train": [conv], "val": []}, {"dataset": "t"})
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "months of work"
    (tmp_path / "empty").mkdir()
    data.write_dataset(tmp_path / "empty", {"train": [conv], "val": []}, {"dataset": "t"})  # empty: fine
    (tmp_path / "notes").rename(tmp_path / "gone.old")  # gone/ missing: a write would move gone.old back
    with pytest.raises(GrafitoError, match=r"gone\.old exists and is not a prepared dataset"):
        data.write_dataset(tmp_path / "gone", {"train": [conv], "val": []}, {"dataset": "t"})
    # the prepare scripts check --out_dir first, before any download or cleaning
    (tmp_path / "in.txt").write_text("### Instruction: q\n\n### Answer: a\n")
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "grafito25k.py"), "--input", str(tmp_path / "in.txt"),
                             "--out_dir", str(tmp_path / "gone")], capture_output=True, text=True)
    assert result.returncode == 2 and "gone.old exists" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "gone.old" / "thesis.tex").read_text() == "months of work"


def test_written_folders_get_the_usual_permissions(tmp_path):
    """mkdtemp makes owner-only folders; a dataset or checkpoint must be as shareable as any file."""
    import os

    umask = os.umask(0o022)
    try:
        data.write_dataset(tmp_path / "d", {"train": [tokenizer.render([("q", "a")])], "val": []}, {"dataset": "t"})
    finally:
        os.umask(umask)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "train.bin").stat().st_mode & 0o777 == 0o644


def test_readers_use_the_previous_version_during_a_swap_without_renaming(tmp_path):
    conv = tokenizer.render([("q", "a")])
    data.write_dataset(tmp_path / "d", {"train": [conv], "val": []}, {"dataset": "t"})
    (tmp_path / "d").rename(tmp_path / "d.old")  # the moment between atomic_dir's two renames
    assert data.load_split(tmp_path / "d", "train").conversation(0) == conv
    assert (tmp_path / "d.old").is_dir() and not (tmp_path / "d").exists()  # left for the writer to finish
    data.write_dataset(tmp_path / "d", {"train": [conv, conv], "val": []}, {"dataset": "t"})
    assert data.load_split(tmp_path / "d", "train").num_conversations == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ----------------------------------------------------------------------------- training batches

def test_packed_rows_hold_whole_conversations_and_shifted_masks(tiny_dataset):
    split = data.load_split(tiny_dataset, "train")
    batches = data.PackedBatches(split, 128, seed=3)
    rows = batches.rows_of_epoch(0)
    assert sorted(i for row in rows for i in row) == list(range(split.num_conversations))  # each once per epoch
    for row in rows:
        assert sum(min(split.lengths[i], 129) for i in row) <= 129 or len(row) == 1
    x, y = batches.batch(rows[:4])
    for r, row in enumerate(rows[:4]):
        tokens = np.concatenate([split.conversation(i)[0] for i in row])[:129]
        mask = np.concatenate([split.conversation(i)[1] for i in row])[:129]
        n = len(tokens)
        assert (x[r, :min(n, 128)] == tokens[:128]).all()
        expected_y = np.where(mask[1:], tokens[1:], -1)
        assert (y[r, :n - 1] == expected_y).all() and (y[r, n - 1:] == -1).all()
    assert batches.rows_of_epoch(1) != rows  # a new order each epoch
    cut, cut_tokens = data.PackedBatches(split, 48).overlong()  # reported by train.py: what the row end cuts off
    long = [n for n in split.lengths if n > 49]
    assert cut == len(long) > 0 and cut_tokens == sum(n - 49 for n in long)


def test_corrupt_compressed_input_is_one_error(tmp_path):
    lines = "".join(json.dumps({"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}"}) + "\n" for i in range(2000))
    corrupt = bytearray(gzip.compress(lines.encode()))  # a header without a file name: deflate data from byte 10
    corrupt[12:20] = b"\xff" * 8  # damaged deflate data: zlib.error, not a short file
    (tmp_path / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "hh_rlhf.py"), "--input", str(tmp_path / "corrupt.jsonl.gz"),
                             "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr


def test_a_json_line_nested_too_deep_is_a_counted_skip(tmp_path):
    path = write_jsonl(tmp_path / "deep.jsonl", [{"chosen": "x"}, "[" * 100000 + "]" * 100000, {"chosen": "y"}])
    report = Report("deep")
    assert len(read_records(path, report, ["chosen"])) == 2 and report.skipped == {"bad_json": 1}


def test_prepare_refuses_an_out_dir_it_cannot_write_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "in.txt").write_text("### Instruction: q\n\n### Answer: a\n")
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "grafito25k.py"), "--input", str(tmp_path / "in.txt"),
                             "--out_dir", str(tmp_path / "file" / "ds")], capture_output=True, text=True)
    assert result.returncode == 2 and "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_prepare_expands_a_tilde_in_paths(tmp_path):
    (tmp_path / "in.txt").write_text("### Instruction: q\n\n### Answer: a\n\n\n### Instruction: r\n\n### Answer: b\n")
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "grafito25k.py"), "--input", "~/in.txt",
                             "--out_dir", "~/ds", "--val_fraction", "0"], capture_output=True, text=True,
                            env={**__import__("os").environ, "HOME": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ds" / "meta.json").is_file() and not (tmp_path / "~").exists()

