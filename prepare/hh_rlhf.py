"""Prepare Anthropic's HH-RLHF conversations into data/hh_rlhf (obsidian-000's dataset).

    python prepare/hh_rlhf.py                                # hub dataset Anthropic/hh-rlhf, helpful-base/train
    python prepare/hh_rlhf.py --split harmless-base/test     # another split of the same repo
    python prepare/hh_rlhf.py --input ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz

Each JSON line holds 'chosen' and 'rejected' transcripts, '\\n\\nHuman: ...\\n\\nAssistant: ...';
the 'chosen' one becomes a conversation, Human turns as instructions, Assistant turns as answers.
"""

import re

from pipeline import Record, Report, build_dataset, check_args, fetch_hub_dataset, parser, read_json_lines, sha256_of

from common import run_cli

REPO_ID = "Anthropic/hh-rlhf"
ROLE = re.compile(r"\n\n(Human|Assistant):")


def parse(rows, report, field):
    records = []
    for line, obj in rows:
        parts = ROLE.split(obj[field])
        if parts[0].strip():
            report.skip("text_before_first_turn", line, parts[0].strip()[:60])
            continue
        roles, texts = parts[1::2], parts[2::2]
        if not roles or roles != ["Human", "Assistant"] * (len(roles) // 2) or len(roles) % 2:
            report.skip("turns_do_not_alternate", line, " ".join(roles))
            continue
        records.append(Record(line, list(zip(texts[0::2], texts[1::2]))))
    return records


def main():
    p = parser("Prepare Anthropic HH-RLHF conversations into token bins.", "hh_rlhf", 512)
    p.add_argument("--split", default="helpful-base/train",
                   help="file of the hub dataset without .jsonl.gz, e.g. harmless-base/test (default %(default)s)")
    p.add_argument("--field", choices=["chosen", "rejected"], default="chosen",
                   help="which transcript of each record to train on (default %(default)s)")
    args = p.parse_args()
    check_args(args)
    filename = f"{args.split}.jsonl.gz"
    path = args.input or fetch_hub_dataset(REPO_ID, filename)
    report = Report(str(path), strict=args.strict)
    records = parse(read_json_lines(path, report, [args.field]), report, args.field)
    build_dataset(args, "hh_rlhf", records, report,
                  source={"hub_dataset": REPO_ID, "file": filename, "path": str(path), "sha256": sha256_of(path),
                          "field": args.field})


if __name__ == "__main__":
    run_cli(main)
