"""Prepare Anthropic's HH-RLHF conversations into data/hh_rlhf (obsidian-000's dataset), or
its preference pairs into data/hh_rlhf_pairs.

    python prepare/hh_rlhf.py                                # hub dataset Anthropic/hh-rlhf, helpful-base/train
    python prepare/hh_rlhf.py --split harmless-base/test     # another split of the same repo
    python prepare/hh_rlhf.py --input ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz
    python prepare/hh_rlhf.py --pairs                        # chosen and rejected answers, for preference training

Each JSON line holds 'chosen' and 'rejected' transcripts, '\\n\\nHuman: ...\\n\\nAssistant: ...';
the 'chosen' one becomes a conversation, Human turns as instructions, Assistant turns as answers.
With --pairs a record becomes a pair: the conversation both transcripts share up to their
last Assistant turn, and the two last answers (see data.py for the format).
"""

import argparse
import re

from pairs import Pairs, pair_from_turns
from pipeline import Conversations, Record, Report, build, check_args, parser, read_records
from sources import fetch_hub_file, sha256_of

from common import GrafitoError, run_cli

REPO_ID = "Anthropic/hh-rlhf"
ROLE = re.compile(r"\n\n(Human|Assistant):")


def split_turns(text):
    """A transcript as ([(human, assistant), ...], None), or (None, (reason, detail)) when malformed."""
    parts = ROLE.split(text)
    if parts[0].strip():
        return None, ("text_before_first_turn", parts[0].strip()[:60])
    roles, texts = parts[1::2], parts[2::2]
    if not roles or roles != ["Human", "Assistant"] * (len(roles) // 2) or len(roles) % 2:
        return None, ("turns_do_not_alternate", " ".join(roles))
    return list(zip(texts[0::2], texts[1::2])), None


def parse(rows, report, field):
    """A Record per row whose transcript `field` is well formed (streamed)."""
    for line, obj in rows:
        turns, problem = split_turns(obj[field])
        if problem:
            report.skip(problem[0], line, problem[1])
            continue
        yield Record(line, turns)


def parse_pairs(rows, report):
    """A Pair per row whose two transcripts are the same conversation up to their last answer
    (streamed)."""
    for line, obj in rows:
        chosen, problem = split_turns(obj["chosen"])
        rejected, rejected_problem = split_turns(obj["rejected"])
        if problem or rejected_problem:
            reason, detail = problem or rejected_problem
            report.skip(reason, line, f"{'chosen' if problem else 'rejected'} transcript: {detail}")
            continue
        pair = pair_from_turns(line, chosen, rejected, report)
        if pair:
            yield pair


def main():
    wants_pairs = argparse.ArgumentParser(add_help=False)
    wants_pairs.add_argument("--pairs", action="store_true")
    name = "hh_rlhf_pairs" if wants_pairs.parse_known_args()[0].pairs else "hh_rlhf"  # out_dir's default
    p = parser("Prepare Anthropic HH-RLHF conversations (or their preference pairs) into token bins.", name, 512)
    p.add_argument("--split", default="helpful-base/train",
                   help="file of the hub dataset without .jsonl.gz, e.g. harmless-base/test (default %(default)s)")
    p.add_argument("--field", choices=["chosen", "rejected"],
                   help="which transcript of each record to train on (default chosen; not with --pairs)")
    p.add_argument("--pairs", action="store_true",
                   help="write preference pairs (shared prompt, chosen and rejected answer) to data/hh_rlhf_pairs")
    args = p.parse_args()
    if args.pairs and args.field:
        raise GrafitoError("--field picks one transcript for SFT; --pairs uses both, so leave --field out")
    check_args(args)
    filename = f"{args.split}.jsonl.gz"
    path = args.input or fetch_hub_file(REPO_ID, filename)
    report = Report(str(path), strict=args.strict)
    source = {"hub_dataset": REPO_ID, "file": filename, "path": str(path), "sha256": sha256_of(path)}
    if args.pairs:
        pairs = parse_pairs(read_records(path, report, ["chosen", "rejected"]), report)
        build(args, Pairs(), pairs, report, name, source={**source, "fields": ["chosen", "rejected"]})
        return
    field = args.field or "chosen"
    records = parse(read_records(path, report, [field]), report, field)
    build(args, Conversations(), records, report, "hh_rlhf", source={**source, "field": field})


if __name__ == "__main__":
    run_cli(main)
