"""Preference pairs: prepare/hh_rlhf.py --pairs, the pairs format in data.py and PairBatches."""

import gzip
import json
import re
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from conftest import HH_RLHF_TEST, ROOT, needs_shared

sys.path.insert(0, str(ROOT / "prepare"))

import data  # noqa: E402
import hh_rlhf  # noqa: E402
import pipeline  # noqa: E402
import tokenizer  # noqa: E402
from common import GrafitoError  # noqa: E402
from pairs import Pair, clean_pairs, pair_in_val, tokenize_pairs  # noqa: E402
from pipeline import Report  # noqa: E402

EOT = tokenizer.EOT


def transcript(*texts):
    """'\\n\\nHuman: t0\\n\\nAssistant: t1...' from alternating Human, Assistant texts."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(texts))


def record(history, instruction, chosen, rejected):
    """A hh-rlhf JSON record: history [(human, assistant), ...], then the last instruction and its two answers."""
    shared = [t for turn in history for t in turn] + [instruction]
    return {"chosen": transcript(*shared, chosen), "rejected": transcript(*shared, rejected)}


def prepare(records, block_size=512, overlong="truncate"):
    """parse, clean and tokenize records as --pairs does; returns (report, [(pair, prompt, chosen, rejected)])."""
    report = Report("test")
    parsed = list(hh_rlhf.parse_pairs(list(enumerate(records, start=1)), report))
    return report, tokenize_pairs(clean_pairs(parsed, report), block_size, overlong, report)


def final_answer(text):
    """The text after a transcript's last 'Assistant:' marker."""
    return text[text.rfind("\n\nAssistant:") + len("\n\nAssistant:"):]


# ----------------------------------------------------------------------------- the real harmless-base test split

@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory):
    """The script run on the real split: (output folder, its report.json, stdout)."""
    out = tmp_path_factory.mktemp("pairs") / "hh_pairs"
    result = subprocess.run([sys.executable, str(ROOT / "prepare" / "hh_rlhf.py"), "--pairs", "--input", str(HH_RLHF_TEST),
                             "--out_dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "report.json").read_text()), result.stdout


@needs_shared
def test_real_split_counts_add_up(real_pairs):
    out, report, stdout = real_pairs
    meta = data.load_meta(out)
    kept = {split: data.load_pairs(out, split).num_pairs for split in data.SPLITS}
    assert meta["kind"] == "pairs" and report["records_read"] == 2312
    assert report["pairs"] == kept["train"] + kept["val"] == report["splits"]["train"]["pairs"] + report["splits"]["val"]["pairs"]
    assert report["records_read"] == report["pairs"] + sum(report["skipped_malformed"].values()) + sum(report["dropped"].values())
    assert 0.02 < kept["val"] / report["pairs"] < 0.09  # --val_fraction 0.05
    # counted independently of the parser: either transcript breaks the Human/Assistant alternation
    rows = [json.loads(line) for line in gzip.open(HH_RLHF_TEST)]
    roles = [[re.findall(r"\n\n(Human|Assistant):", r[f]) for f in ("chosen", "rejected")] for r in rows]
    broken = sum(any(rs != ["Human", "Assistant"] * (len(rs) // 2) or len(rs) % 2 for rs in pair) for pair in roles)
    assert report["skipped_malformed"] == {"turns_do_not_alternate": broken}
    assert report["repaired"]["oldest_turns_cut_to_fit_block_size"] > 0 and report["dropped"]["longer_than_block_size"] > 0
    assert f"kept {report['pairs']:,} pairs" in stdout


@needs_shared
def test_real_split_rows_share_the_prompt_and_supervise_only_the_final_answers(real_pairs):
    out, _, _ = real_pairs
    report = Report(str(HH_RLHF_TEST))
    rows = list(pipeline.read_records(HH_RLHF_TEST, report, ["chosen", "rejected"]))
    raw = dict(rows)
    kept = clean_pairs(hh_rlhf.parse_pairs(rows, report), report)
    uncut = {pair.line: pair for pair in kept}
    expected = {"train": [], "val": []}
    for pair, _, _, _ in tokenize_pairs(kept, 512, "truncate", report):  # split by the whole prompt, before a cut
        expected["val" if pair_in_val(uncut[pair.line], 0.05, 1337) else "train"].append(pair)
    checked = 0
    for split in data.SPLITS:
        pairs = data.load_pairs(out, split)
        assert pairs.num_pairs == len(expected[split])
        for i, pair in enumerate(expected[split]):
            chosen, chosen_mask, rejected, rejected_mask = pairs.pair(i)
            n = int(pairs.prompt_lengths[i])
            assert chosen[:n] == rejected[:n] == tokenizer.render_prompt(pair.history, pair.instruction)
            assert chosen_mask == [0] * n + [1] * (len(chosen) - n) and rejected_mask == [0] * n + [1] * (len(rejected) - n)
            assert chosen[-1] == rejected[-1] == EOT
            assert tokenizer.decode(chosen[n:-1]) == " " + pair.chosen and tokenizer.decode(rejected[n:-1]) == " " + pair.rejected
            for side, ids in (("chosen", chosen), ("rejected", rejected)):  # the source's own last answer, normalised
                source = pipeline.normalize_whitespace(unicodedata.normalize("NFC", final_answer(raw[pair.line][side])))
                assert tokenizer.decode(ids[n:-1]) == " " + tokenizer.neutralize(source)
            assert tokenizer.decode(chosen[:n]).endswith(f"### Instruction: {pair.instruction}\n\n### Answer:")
            checked += 1
    assert checked > 2200


# ----------------------------------------------------------------------------- cleaning, one reason each

def test_transcripts_that_differ_before_the_last_answer_are_skipped():
    good = record([("hi", "hello")], "bye", "see you", "go away")
    other_history = {"chosen": good["chosen"], "rejected": transcript("hi", "HELLO THERE", "bye", "go away")}
    other_instruction = {"chosen": good["chosen"], "rejected": transcript("hi", "hello", "ciao", "go away")}
    extra_turn = {"chosen": good["chosen"], "rejected": transcript("bye", "go away")}
    spacing_only = {"chosen": good["chosen"], "rejected": transcript("hi  ", "hello\u00a0", "bye", "leave now")}
    report, out = prepare([good, other_history, other_instruction, extra_turn, spacing_only])
    assert [pair.line for pair, *_ in out] == [1, 5]  # the same conversation once cleaned is a pair
    assert report.skipped == {"chosen_and_rejected_differ_before_last_answer": 3}


def test_transcripts_that_do_not_alternate_are_skipped_naming_the_side():
    rows = [(1, {"chosen": transcript("a", "b"), "rejected": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c"})]
    report = Report("x")
    assert list(hh_rlhf.parse_pairs(rows, report)) == [] and report.skipped == {"turns_do_not_alternate": 1}
    with pytest.raises(GrafitoError, match="line 1: turns do not alternate: rejected transcript"):
        list(hh_rlhf.parse_pairs(rows, Report("x", strict=True)))


def test_pairs_without_a_preference_are_dropped():
    report, out = prepare([record([], "q", "Sure, here it is.", "Sure, here it is."),
                           record([], "q", "You're welcome.", "you're WELCOME!"),
                           record([], "q", "You're welcome.", "You are welcome.")])
    assert [pair.line for pair, *_ in out] == [3]
    assert report.dropped == {"same_answers_up_to_case_or_punctuation": 2}


def test_empty_answers_and_leaked_markers_drop_the_pair():
    report, out = prepare([record([], "q", "", "an answer"),
                           record([], "q", "an answer", "  "),
                           record([], "q", "fine", "fine. Human: and now I ask"),
                           record([("a", "b Assistant: c")], "q", "one", "two"),
                           record([], "q", "one", "two")])
    assert [pair.line for pair, *_ in out] == [5]
    assert report.dropped == {"empty_answer": 2, "role_marker_inside_text": 2}


def test_a_poor_rejected_answer_is_kept_but_a_poor_chosen_one_is_not():
    report, out = prepare([record([], "What is the best knife?", "I won't help with that.", "What is the best knife?"),
                           record([], "tell me", "...", "Here is how."),
                           record([], "What is the best knife?", "What is the best knife?", "A sharp one.")])
    assert [pair.line for pair, *_ in out] == [1]
    assert report.dropped == {"answer_without_words": 1, "answer_repeats_instruction": 1}


def test_duplicate_pairs_are_dropped_but_another_rejected_answer_is_another_pair():
    report, out = prepare([record([], "Name a colour", "Blue.", "No."),
                           record([], "Name a colour", "Blue.", "No."),
                           record([], "name a colour!", "blue", "no"),
                           record([], "Name a colour", "Blue.", "Why?")])
    assert [pair.line for pair, *_ in out] == [1, 4]
    assert report.dropped == {"duplicate_exact": 1, "duplicate_normalized": 1}


def test_overlong_pairs_lose_their_oldest_turns_and_keep_both_answers():
    words = " ".join(["word"] * 30)
    history = [(f"old question {i}", words) for i in range(4)]
    long_pair = record(history, "last question", "chosen answer", "rejected " + words)
    too_long = record([("a", "b")], "q " * 150, "short", "short too")
    report, out = prepare([long_pair, too_long], block_size=120)
    (pair, prompt, chosen, rejected), = out
    assert 0 < len(pair.history) < len(history) and pair.history == history[-len(pair.history):]  # the newest turns stay
    assert len(prompt) + max(len(chosen), len(rejected)) <= 120
    assert tokenizer.decode(chosen) == " chosen answer<|endoftext|>" and tokenizer.decode(rejected).startswith(" rejected word")
    assert tokenizer.decode(prompt).startswith(f"### Instruction: {pair.history[0][0]}")
    assert report.repaired["oldest_turns_cut_to_fit_block_size"] == 1 and report.dropped == {"longer_than_block_size": 1}
    report, out = prepare([long_pair, too_long], block_size=120, overlong="drop")
    assert out == [] and report.dropped == {"longer_than_block_size": 2}


def test_val_split_follows_the_prompt_and_is_stable():
    pairs = [Pair(i, [], f"question {i // 2}", f"yes {i}", f"no {i}") for i in range(800)]
    in_val = [pair_in_val(p, 0.1, 1337) for p in pairs]
    assert 30 < sum(in_val) < 130
    assert in_val[0::2] == in_val[1::2]  # two pairs with one prompt never straddle train and val
    assert in_val == [pair_in_val(p, 0.1, 1337) for p in pairs]
    assert in_val != [pair_in_val(p, 0.1, 7) for p in pairs]


def test_script_pairs_options(tmp_path):
    script = [sys.executable, str(ROOT / "prepare" / "hh_rlhf.py")]
    result = subprocess.run(script + ["--pairs", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "default: data/hh_rlhf_pairs" in " ".join(result.stdout.split())
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(record([], "q", "a", "b")) + "\n")
    result = subprocess.run(script + ["--pairs", "--field", "rejected", "--input", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "--field" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- the format and its reader

def write_toy_pairs(folder, pairs, val=()):
    """write_pairs of [(prompt, chosen answer, rejected answer)] with ids < 1000; EOT appended to each answer."""
    with_eot = lambda rows: [(p, c + [EOT], r + [EOT]) for p, c, r in rows]  # noqa: E731
    data.write_pairs(folder, {"train": with_eot(pairs), "val": with_eot(val)}, {"dataset": "toy"})
    return data.load_pairs(folder, "train")


TOY = [([1, 2, 3], [10, 11], [20]),
       ([4, 5], [12], [21, 22, 23, 24]),
       ([6, 7, 8, 9], [13, 14, 15], [25, 26])]


def test_pairs_round_trip_with_lengths(tmp_path):
    split = write_toy_pairs(tmp_path / "d", TOY)
    assert split.num_pairs == 3 and split.prompt_lengths.tolist() == [3, 2, 4]
    assert split.answer_lengths.tolist() == [[3, 2], [2, 5], [4, 3]]
    assert split.row_lengths.tolist() == [[6, 5], [4, 7], [8, 7]]
    assert split.pair(1) == ([4, 5, 12, EOT], [0, 0, 1, 1], [4, 5, 21, 22, 23, 24, EOT], [0, 0, 1, 1, 1, 1, 1])
    assert data.load_pairs(tmp_path / "d", "val").num_pairs == 0
    assert data.EOT == tokenizer.EOT


def test_each_reader_refuses_the_other_kind(tmp_path):
    write_toy_pairs(tmp_path / "pairs", TOY)
    data.write_dataset(tmp_path / "sft", {"train": [tokenizer.render([("q", "a")])], "val": []}, {"dataset": "t"})
    with pytest.raises(GrafitoError, match="preference-pairs dataset .*prepared with --pairs.*rejected answers"):
        data.load_split(tmp_path / "pairs", "train")  # what train.py, eval.py and sample.py read conversations with
    with pytest.raises(GrafitoError, match="not preference pairs; prepare pairs with --pairs"):
        data.load_pairs(tmp_path / "sft", "train")
    data.check_kind(data.load_meta(tmp_path / "sft"), "sft")  # an SFT meta.json has no "kind"


def test_a_damaged_pairs_split_is_a_clear_error(tmp_path):
    write_toy_pairs(tmp_path / "d", TOY)
    mask_file = tmp_path / "d" / "train.mask.bin"
    good = mask_file.read_bytes()
    # the same prompt token supervised in both rows; one prompt's last token (prompt lengths differ); an end-of-text not
    for damage in ((1, 7), (2,), (5,)):
        mask = bytearray(good)
        for at in damage:
            mask[at] ^= 1
        mask_file.write_bytes(bytes(mask))
        with pytest.raises(GrafitoError, match="train split is damaged"):
            data.load_pairs(tmp_path / "d", "train")
    with pytest.raises(GrafitoError, match="end with <|endoftext|>"):
        data.write_pairs(tmp_path / "e", {"train": [([1], [2], [3])]}, {})


def test_pair_batches_put_chosen_rows_first_with_next_token_targets_and_right_padding(tmp_path):
    split = write_toy_pairs(tmp_path / "d", TOY)
    x, y = data.PairBatches(split, 64, pad_multiple=4).batch([2, 0])
    rows = [split.pair(2)[0], split.pair(0)[0], split.pair(2)[2], split.pair(0)[2]]  # chosen 2, 0, then rejected 2, 0
    masks = [split.pair(2)[1], split.pair(0)[1], split.pair(2)[3], split.pair(0)[3]]
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == np.int64  # longest row 8 tokens: 7 inputs, rounded to 8
    for r, (ids, mask) in enumerate(zip(rows, masks)):
        n = len(ids) - 1
        assert x[r, :n].tolist() == ids[:-1] and (x[r, n:] == EOT).all()
        assert y[r, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])] and (y[r, n:] == -1).all()
    assert y[0].tolist() == [-1, -1, -1, 13, 14, 15, EOT, -1]  # the first answer token is the target at the prompt's end
    exact, _ = data.PairBatches(split, 64, pad_multiple=1).batch([2, 0])
    capped, _ = data.PairBatches(split, 7, pad_multiple=4).batch([1])
    assert exact.shape == (4, 7) and capped.shape == (2, 7)  # the longest row; rounding never passes block_size


def test_a_pair_row_does_not_depend_on_its_batch(tmp_path):
    split = write_toy_pairs(tmp_path / "d", TOY)
    batches = data.PairBatches(split, 64, pad_multiple=1)
    alone_x, alone_y = batches.batch([1])
    x, y = batches.batch([0, 1, 2])
    assert (x[[1, 4], :alone_x.shape[1]] == alone_x).all() and (y[[1, 4], :alone_y.shape[1]] == alone_y).all()
    assert (y[[1, 4], alone_y.shape[1]:] == -1).all()


def test_pair_batches_refuse_rows_longer_than_block_size(tmp_path):
    split = write_toy_pairs(tmp_path / "d", TOY)  # the longest row has 8 tokens: it needs block_size 7
    data.PairBatches(split, 7)
    with pytest.raises(GrafitoError, match=r"1 of 3 pairs .* --block_size 6"):
        data.PairBatches(split, 6)


@pytest.mark.parametrize("length_group", [0, 3])
def test_pair_batches_resume_exactly_and_visit_every_pair_each_epoch(tmp_path, length_group):
    toy = [([1 + i % 5] * (2 + i % 3), [30 + i], [60 + i, 61]) for i in range(10)]
    split = write_toy_pairs(tmp_path / "d", toy)
    straight = data.PairBatches(split, 32, seed=5, length_group=length_group)
    steps = [straight.next_pairs(4) for _ in range(8)]  # 32 pairs: three epochs and a bit
    epochs = [sum(steps, [])[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and epochs[0] != epochs[1]
    first = data.PairBatches(split, 32, seed=5, length_group=length_group)
    for _ in range(3):
        first.next_pairs(4)
    resumed = data.PairBatches(split, 32, seed=5, length_group=length_group)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    for step in steps[3:]:
        pairs = resumed.next_pairs(4)
        assert pairs == step
        for a, b in zip(resumed.batch(pairs), straight.batch(step)):
            assert (a == b).all()
    assert data.PairBatches(split, 32, seed=5, shuffle=False).next_pairs(12) == list(range(10)) + [0, 1]


def test_length_groups_sort_each_group_of_the_shuffled_order_longest_first(tmp_path):
    toy = [([1] * (2 + (7 * i) % 11), [30], [60, 61]) for i in range(10)]
    split = write_toy_pairs(tmp_path / "d", toy)
    shuffled = data.PairBatches(split, 32, seed=5).order_of_epoch(1)
    grouped = data.PairBatches(split, 32, seed=5, length_group=4).order_of_epoch(1)
    longest = split.row_lengths.max(axis=1)
    for start in (0, 4, 8):  # the same pairs in each group, longest first
        group = grouped[start:start + 4]
        assert sorted(group) == sorted(shuffled[start:start + 4]) and list(longest[group]) == sorted(longest[group], reverse=True)


def test_pair_eval_batches_cover_the_split_in_file_order(tmp_path):
    split = write_toy_pairs(tmp_path / "d", TOY * 3)
    batches = data.pair_eval_batches(split, 64, 4)
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    pairs, x, y = batches[2]
    assert x.shape[0] == 2 and (y >= 0).sum() == sum(split.answer_lengths[8])  # the last pair's two answers, nothing else
    assert len(data.pair_eval_batches(split, 64, 4, max_batches=2)) == 2
