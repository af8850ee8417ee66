"""prepare/text.py: raw text (text files, JSON lines, Parquet, a hub corpus) into token shards
that data.load_text reads back as exactly the documents' tokens; bad input, and a killed
prepare that resumes to the same bytes."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from conftest import ROOT, SHARED, FakeHub

sys.path.insert(0, str(ROOT / "prepare"))

import data  # noqa: E402
import pipeline  # noqa: E402
import text  # noqa: E402
from common import GrafitoError  # noqa: E402

BROWN = SHARED / "data" / "brown" / "brown.jsonl.gz"
EOT = 50256
GPT2 = tiktoken.get_encoding("gpt2")


def brown_rows(count):
    if not BROWN.exists():
        pytest.skip("../shared data not present")
    with gzip.open(BROWN, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def write_jsonl(path, rows, compress=False):
    lines = "".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows)
    path.write_bytes(gzip.compress(lines.encode()) if compress else lines.encode())
    return path


def run_text(*argv):
    """text.py's main() in this process, as the command line would run it; its summary."""
    saved = sys.argv
    sys.argv = ["text.py", *map(str, argv)]
    try:
        return text.main()
    finally:
        sys.argv = saved


def expected_ids(document):
    return GPT2.encode_ordinary(document) + [EOT]


def shard_documents(folder, split):
    """Each shard of a split as the list of its documents' ids (cut after each <|endoftext|>)."""
    shards = []
    for shard in data.load_text(folder, split).shards:
        ids = shard.tolist()
        assert ids[-1] == EOT  # whole documents only
        ends = [i + 1 for i, t in enumerate(ids) if t == EOT]
        shards.append([ids[a:b] for a, b in zip([0] + ends[:-1], ends)])
    return shards


def split_texts(folder, split):
    return [GPT2.decode(ids[:-1]) for shard in shard_documents(folder, split) for ids in shard]


def files_of(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.name != "report.json"}


# ----------------------------------------------------------------------------- documents -> shards

def test_documents_are_their_tokens_and_end_of_text_in_shards_of_whole_documents(tmp_path):
    texts = [row["text"] for row in brown_rows(24)]
    write_jsonl(tmp_path / "brown.jsonl.gz", brown_rows(24), compress=True)
    limit = 9000  # Brown documents are about 2,600 tokens: three or so a shard
    summary = run_text("--input", tmp_path / "brown.jsonl.gz", "--out_dir", tmp_path / "brown",
                       "--shard_tokens", limit, "--val_fraction", 0.25)
    val = split_texts(tmp_path / "brown", "val")
    assert 0 < len(val) < len(texts)
    assert split_texts(tmp_path / "brown", "train") == [t for t in texts if t not in val]  # source order kept
    assert val == [t for t in texts if t in val]
    meta = data.load_meta(tmp_path / "brown")
    for split in ("train", "val"):
        shards = shard_documents(tmp_path / "brown", split)
        assert all(ids == expected_ids(GPT2.decode(ids[:-1])) for shard in shards for ids in shard)
        sizes = [sum(map(len, shard)) for shard in shards]
        assert all(size <= limit or len(shard) == 1 for size, shard in zip(sizes, shards))
        assert all(size + len(following[0]) > limit for size, following in zip(sizes, shards[1:]))  # full before the next
        assert [(e["documents"], e["tokens"]) for e in meta["splits"][split]["shards"]] == \
            [(len(shard), size) for shard, size in zip(shards, sizes)]
    assert len(shard_documents(tmp_path / "brown", "train")) >= 4
    assert summary["documents"] == 24 and summary["tokens"] == sum(len(expected_ids(t)) for t in texts)

    # a document's split depends on its text alone: with other documents around it, it stays where it was
    write_jsonl(tmp_path / "other.jsonl", [{"text": "a document only this corpus has"}] + brown_rows(24)[::-1])
    run_text("--input", tmp_path / "other.jsonl", "--out_dir", tmp_path / "other", "--val_fraction", 0.25)
    assert sorted(split_texts(tmp_path / "other", "val")) == sorted(val)
    run_text("--input", tmp_path / "brown.jsonl.gz", "--out_dir", tmp_path / "seed", "--val_fraction", 0.25,
             "--seed", 7)
    assert split_texts(tmp_path / "seed", "val") != val


def test_windows_read_back_exactly_the_documents_tokens(tmp_path):
    rows = brown_rows(8)
    write_jsonl(tmp_path / "b.jsonl", rows)
    run_text("--input", tmp_path / "b.jsonl", "--out_dir", tmp_path / "b", "--shard_tokens", 6000, "--val_fraction", 0)
    split = data.load_text(tmp_path / "b", "train")
    meta_shards = data.load_meta(tmp_path / "b")["splits"]["train"]["shards"]
    documents = iter(expected_ids(row["text"]) for row in rows)
    expected = [np.concatenate([next(documents) for _ in range(entry["documents"])]) for entry in meta_shards]
    assert split.documents == 8 and split.num_tokens == sum(map(len, expected)) and len(split.shards) > 1
    windows = data.TextWindows(split, block_size=64, seed=3)
    picks = windows.next_windows(40)
    x, y = windows.batch(picks)
    for row, (shard, offset) in enumerate(picks):
        assert x[row].tolist() == expected[shard][offset:offset + 64].tolist()
        assert y[row].tolist() == expected[shard][offset + 1:offset + 65].tolist()


def test_text_files_unicode_a_literal_end_of_text_and_what_is_dropped(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    unicode_text = "مرحبا بالعالم 🙂 — 你好，世界。\nZweite Zeile: äöü ß.\n"
    literal = "A tokenizer test: <|endoftext|> is only text here, and so is <|endoftext|>."
    (corpus / "a_unicode.txt").write_text(unicode_text, encoding="utf-8")
    (corpus / "b_literal.txt").write_text(literal, encoding="utf-8")
    (corpus / "c_empty.txt").write_text("")
    (corpus / "d_blank.txt").write_text(" \n\t\n")
    (corpus / "e_image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")  # not UTF-8
    (corpus / "f_utf16.txt").write_bytes("UTF-16 text".encode("utf-16-le"))  # valid UTF-8, but NULs
    (corpus / "g_copy.txt").write_text(unicode_text, encoding="utf-8")
    write_jsonl(corpus / "h_rows.jsonl", [{"text": "first row"}, "{not json", {"body": "no text field"},
                                          {"text": 42}, ["not", "an", "object"], {"text": "last row"}])
    write_jsonl(corpus / "i_noise.jsonl", ["{{{"] * 12 + [{"text": "after the noise"}])
    summary = run_text("--input", corpus, "--out_dir", tmp_path / "out", "--val_fraction", 0)
    assert split_texts(tmp_path / "out", "train") == [unicode_text, literal, "first row", "last row", "after the noise"]
    train = np.concatenate(data.load_text(tmp_path / "out", "train").shards).tolist()
    assert train.count(EOT) == 5  # the literal marker is ordinary text, never a document end
    assert summary["records_read"] == 26
    assert summary["dropped"] == {"empty": 2, "binary": 1, "duplicate": 1}
    assert summary["skipped_malformed"] == {"invalid_utf8": 1, "bad_json": 13, "missing_field": 1, "not_text": 1,
                                            "not_an_object": 1}
    lines = summary["first_lines"]
    assert lines["empty"] == ["c_empty.txt:1", "d_blank.txt:1"] and lines["invalid_utf8"] == ["e_image.txt:1"]
    assert lines["binary"] == ["f_utf16.txt:1"] and lines["duplicate"] == ["g_copy.txt:1"]
    assert lines["bad_json"] == ["h_rows.jsonl:2"] + [f"i_noise.jsonl:{k}" for k in range(1, 5)]
    assert lines["missing_field"] == ["h_rows.jsonl:3"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["dropped"] == summary["dropped"]


def test_worker_processes_write_the_same_shards(tmp_path, monkeypatch):
    rows = brown_rows(12)
    rows = rows + [{"text": row["text"][:300 * k]} for k, row in enumerate(rows, start=1)] + rows[:3]  # 3 duplicates
    write_jsonl(tmp_path / "b.jsonl", rows)
    monkeypatch.setattr(text, "CHUNK_DOCUMENTS", 3)
    monkeypatch.setattr(pipeline, "INLINE_CHUNKS", 1)
    for workers in (1, 2):
        run_text("--input", tmp_path / "b.jsonl", "--out_dir", tmp_path / f"w{workers}" / "b", "--workers", workers,
                 "--shard_tokens", 5000, "--val_fraction", 0.2)
    assert files_of(tmp_path / "w1" / "b") == files_of(tmp_path / "w2" / "b")
    assert json.loads((tmp_path / "w2" / "b" / "report.json").read_text())["dropped"] == {"duplicate": 3}


# ----------------------------------------------------------------------------- a killed prepare resumes

KILLED = r"""
import multiprocessing, os, signal, sys
from pathlib import Path
sys.path.insert(0, {prepare!r})
import pipeline, text

def die():
    Path({pids!r}).write_text(" ".join(str(p.pid) for p in multiprocessing.active_children()))
    os.kill(os.getpid(), signal.SIGKILL)

argv = {argv!r}
if argv[argv.index("--workers") + 1] != "1":  # every chunk but the first in the worker processes
    pipeline.INLINE_CHUNKS, text.CHUNK_DOCUMENTS = 1, 2

recorded = dict()  # split -> the tokens of its partly filled shard that the last progress.json counts
checkpoint = text.Run.checkpoint
def hooked_checkpoint(self, *args, **kwargs):
    checkpoint(self, *args, **kwargs)
    recorded.update((split, shards.tokens) for split, shards in self.splits.items())
text.Run.checkpoint = hooked_checkpoint

when = {when!r}
if when == "after_first_shard":
    save = text.Work.save
    def hooked(self, state):
        save(self, state)
        if any(split["shards"] for split in state["splits"].values()):
            die()
    text.Work.save = hooked
elif when == "inside_a_shard":  # a document appended (and on disk) after what progress.json counts
    add = text.SplitShards.add
    def hooked(self, ids):
        add(self, ids)
        if recorded.get(self.split):
            self.file.flush()
            die()
    text.SplitShards.add = hooked
elif when == "shard_renamed_before_progress":  # a shard renamed as full, progress.json not yet saying so
    finish = text.SplitShards.finish
    def hooked(self):
        finish(self)
        if recorded.get(self.split):
            die()
    text.SplitShards.finish = hooked
sys.argv = ["text.py", *argv]
if __name__ == "__main__":  # not in the worker processes, which import this file
    text.main()
"""
WHEN = ["after_first_shard", "inside_a_shard", "shard_renamed_before_progress"]


@pytest.fixture(scope="module")
def brown_corpus(tmp_path_factory):
    """40 Brown documents with a few problems, and the dataset an uninterrupted prepare makes of them."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = brown_rows(40)
    rows[5:5] = ["{broken", {"text": ""}, rows[2]]  # a skip, a drop and a duplicate early on
    write_jsonl(folder / "brown.jsonl", rows)
    options = ["--input", folder / "brown.jsonl", "--shard_tokens", 12000, "--val_fraction", 0.2, "--workers", 1]
    summary = run_text(*options, "--out_dir", folder / "whole" / "brown")
    return options, folder / "whole" / "brown", summary


@pytest.mark.parametrize("when,workers", [(when, 1) for when in WHEN] + [("after_first_shard", 2)])
def test_a_killed_prepare_resumes_to_the_same_bytes(tmp_path, brown_corpus, when, workers):
    options, whole, whole_summary = brown_corpus
    out_dir = tmp_path / "brown"
    argv = [str(a) for a in options + ["--out_dir", out_dir]]
    argv[argv.index("--workers") + 1] = str(workers)
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(prepare=str(ROOT / "prepare"), when=when, argv=argv, pids=str(tmp_path / "pids")))
    with open(tmp_path / "killed.log", "w") as log:  # not a pipe: the run ends without waiting for its workers
        killed = subprocess.run([sys.executable, script], stdout=log, stderr=log, timeout=300)
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    workers_left = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert len(workers_left) == (2 if workers == 2 else 0)
    deadline = time.monotonic() + 30
    while workers_left and time.monotonic() < deadline:  # a killed prepare's worker processes end by themselves
        time.sleep(0.2)
        workers_left = [pid for pid in workers_left if pipeline.process_running(pid)]
    for pid in workers_left:  # not to outlive a failed test
        os.kill(pid, signal.SIGKILL)
    assert not workers_left
    work = tmp_path / ".brown.text-work"
    assert not out_dir.exists() and (work / "progress.json").is_file()  # nothing where train.py would read
    progress = json.loads((work / "progress.json").read_text())
    assert progress["records_done"] > 0 and len(progress["consumed"]) >= 1
    recorded = {e["file"] for split in progress["splits"].values() for e in split["shards"]}
    finished = {p.name for p in (work / "dataset").glob("*.bin")}
    assert finished - recorded if when == "shard_renamed_before_progress" else finished == recorded
    if when == "after_first_shard":
        assert len(progress["consumed"]) == 1
    if when == "inside_a_shard":  # a shard being filled holds more than progress.json counts
        assert any((work / "dataset" / (data.shard_file(name, len(split["shards"])) + ".partial")).stat().st_size
                   > 2 * split["partial"]["tokens"] > 0 for name, split in progress["splits"].items())
    if when == "after_first_shard":
        other = [a if a != "0.2" else "0.3" for a in argv]
        with pytest.raises(GrafitoError, match=r"unfinished prepare of other options \(--val_fraction 0.2\)"):
            run_text(*other)
        with pytest.raises(GrafitoError, match="unfinished prepare of another source"):
            run_text(*[a if a != argv[1] else str(BROWN) for a in argv])
    summary = run_text(*argv)
    assert files_of(out_dir) == files_of(whole)
    assert summary["resumed"]["shards"] >= 1 and not work.exists()
    assert {k: v for k, v in summary.items() if k not in ("resumed", "seconds", "tokens_per_second")} == \
        {k: v for k, v in whole_summary.items() if k not in ("resumed", "seconds", "tokens_per_second")}


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path, capsys):
    def refused(path, match, *options):
        with pytest.raises(GrafitoError, match=match):
            run_text("--input", path, "--out_dir", tmp_path / "out", *options)
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.text-work").exists()

    (tmp_path / "empty.jsonl").write_text("")
    refused(tmp_path / "empty.jsonl", r"no document is left for the train split \(0 records read; the source holds no records\)")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  "}])
    refused(tmp_path / "blank.jsonl", r"\(2 records read; empty 2\); nothing written")
    write_jsonl(tmp_path / "fields.jsonl", [{"id": 1, "content": "words", "url": "u"}, {"id": 2, "content": "more"}])
    refused(tmp_path / "fields.jsonl", r"none of the first 2 records has a text field 'text'; their fields: id, "
                                       r"content, url; name the one holding the text with --text_field")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    refused(tmp_path / "binary.jsonl", r"none of its [\d,]+ records can be read")
    (tmp_path / "binary.jsonl.gz").write_bytes(b"\x1f\x8b" + bytes(range(256)))
    refused(tmp_path / "binary.jsonl.gz", r"unreadable, corrupt or truncated")
    write_jsonl(tmp_path / "one.jsonl", [{"text": "a single document"}])
    refused(tmp_path / "one.jsonl", r"1 records read; every document went to val", "--val_fraction", 0.99)
    refused(tmp_path / "one.jsonl", r"shard_tokens = 0 is invalid", "--shard_tokens", 0)

    first = text.Work(tmp_path / "busy", {"seed": 1})
    first.open()
    with pytest.raises(GrafitoError, match=r"another prepare is writing .*\.busy\.text-work \(the same --out_dir\)"):
        text.Work(tmp_path / "busy", {"seed": 1}).open()
    first.discard()

    data.write_dataset(tmp_path / "chat", {"train": [([1, 2, EOT], [0, 1, 1])], "val": []}, {"dataset": "chat"})
    with pytest.raises(GrafitoError, match=r"--out_dir .*chat holds an SFT dataset \(conversations\); a text dataset "
                                           r"would replace it"):
        run_text("--input", tmp_path / "one.jsonl", "--out_dir", tmp_path / "chat")
    assert data.load_split(tmp_path / "chat", "train").num_conversations == 1  # untouched

    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format_version": 0, "kind": "text", "splits": {}}))
    with pytest.raises(GrafitoError, match="format version 0, expected 1"):
        data.load_text(old, "train")
    capsys.readouterr()
    run_text("--input", tmp_path / "one.jsonl", "--out_dir", old, "--val_fraction", 0)
    assert "holds a text dataset of format version 0 (this grafito reads 1); it is replaced" in capsys.readouterr().out
    assert split_texts(old, "train") == ["a single document"]


# ----------------------------------------------------------------------------- a hub corpus

def text_script(args, env):
    return subprocess.run([sys.executable, str(ROOT / "prepare" / "text.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_hub_corpus_subset_is_read_file_by_file_up_to_max_tokens(tmp_path, fake_hub):
    repo = tmp_path / "served"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "data").mkdir()
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/*\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
                                    "    path: sample/10BT/*\n---\n# A stand-in for FineWeb-Edu\n")
    rows = brown_rows(6)
    names = ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    for name, part in zip(names, (rows[:3], rows[3:] + rows[:1])):  # the last row repeats the first
        pq.write_table(pa.table({"text": [r["text"] for r in part], "id": [r["id"] for r in part],
                                 "score": [3.5] * len(part)}), repo / name)
    pq.write_table(pa.table({"text": ["the default subset"]}), repo / "data" / "train.parquet")
    FakeHub.repos = {"HuggingFaceFW/fineweb-edu": repo}
    texts = [r["text"] for r in rows]

    result = text_script(["--input", "hub:HuggingFaceFW/fineweb-edu", "--subset", "sample-10BT", "--out_dir",
                          tmp_path / "all", "--val_fraction", 0], fake_hub)
    assert result.returncode == 0, result.stderr[-3000:]
    assert split_texts(tmp_path / "all", "train") == texts
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert report["first_lines"]["duplicate"] == ["sample/10BT/001_00000.parquet:4"]
    assert data.load_meta(tmp_path / "all")["source"]["files"] == names

    FakeHub.requests.clear()
    budget = sum(len(expected_ids(t)) for t in texts[:2]) + 10  # the third document would pass it
    result = text_script(["--input", "hub:HuggingFaceFW/fineweb-edu", "--subset", "sample-10BT", "--out_dir",
                          tmp_path / "some", "--val_fraction", 0, "--max_tokens", budget], fake_hub)
    assert result.returncode == 0, result.stderr[-3000:]
    assert split_texts(tmp_path / "some", "train") == texts[:2]
    assert data.load_meta(tmp_path / "some")["stopped_at_max_tokens"] is True
    assert not [r for r in FakeHub.requests if r.endswith(names[1])]  # the second file is never downloaded


# ----------------------------------------------------------------------------- the duplicate check

def test_the_digest_table_is_a_set():
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2 ** 63, size=3000, dtype=np.int64)] + [0, 1, 2 ** 64 - 1]
    values += values[::7] + [v ^ (1 << 40) for v in values[:50]]  # repeats, and values sharing their low bits
    digests, reference = text.DigestSet(slots=8), set()  # a tiny table: it grows many times
    for v in values:
        assert digests.add(v) == ((v or 1) not in reference)
        reference.add(v or 1)
    assert digests.count == len(reference) and len(digests.table) >= len(reference) / digests.MAX_LOAD
    restored = text.DigestSet(slots=8)
    restored.add_new(sorted(reference))
    assert not any(restored.add(v) for v in values) and restored.add(12345678901)
