"""Prepare dolly-s, a subset of databricks-dolly-15k, into data/dolly.

    python prepare/dolly.py                     # hub dataset databricks/databricks-dolly-15k
    python prepare/dolly.py --input databricks-dolly-15k.jsonl

The original grafito README names a 4,067-sample 'dolly-s' without saying how it was
chosen. Its samples sit inside grafito-25k (4,067 consecutive samples in dolly's style),
and every one of their responses is at most 84 characters long, with the context field
left out. So dolly-s here is: responses of at most --max_response_chars (84) characters,
all categories unless --categories narrows them. Unlike the original, the context is kept
by default, appended to the instruction as

    {instruction}\\n\\nContext: {context}

because without it the many "Given this paragraph..." rows ask about text the model never
sees (--context drop reproduces the original; such rows are then dropped and counted).
"""

from pipeline import Conversations, Record, Report, build, check_args, parser, read_records
from sources import fetch_hub_file, sha256_of

from common import GrafitoError, run_cli
from configurator import check_options, integer

REPO_ID = "databricks/databricks-dolly-15k"
FILENAME = "databricks-dolly-15k.jsonl"
KEYS = ["instruction", "context", "response", "category"]
CATEGORIES = ["brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
              "information_extraction", "open_qa", "summarization"]


def select(rows, report, categories, max_response_chars, context):
    """A Record per row that the options select (streamed)."""
    for line, row in rows:
        if categories and row["category"] not in categories:
            report.drop("category_not_selected", line)
            continue
        if max_response_chars and len(row["response"].strip()) > max_response_chars:
            report.drop("response_longer_than_max", line)
            continue
        instruction, has_context = row["instruction"].strip(), bool(row["context"].strip())
        if has_context and context == "skip":
            report.drop("has_context", line)
            continue
        if has_context and context == "keep":
            instruction = f"{instruction}\n\nContext: {row['context'].strip()}"
        yield Record(line, [(instruction, row["response"])])


def main():
    p = parser("Prepare dolly-s (a subset of databricks-dolly-15k) into token bins.", "dolly", 1024)
    p.add_argument("--max_response_chars", type=int, default=84,
                   help="keep responses up to this many characters, 0 for all (default %(default)s, as dolly-s)")
    p.add_argument("--categories", default="", help=f"comma-separated subset of: {', '.join(CATEGORIES)} (default all)")
    p.add_argument("--context", choices=["keep", "drop", "skip"], default="keep",
                   help="context field: append to the instruction, leave out, or skip rows having one (default %(default)s)")
    args = p.parse_args()
    check_args(args)
    check_options(vars(args), {"max_response_chars": integer(0)})
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise GrafitoError(f"--categories: unknown {', '.join(unknown)}; choose from {', '.join(CATEGORIES)}")
    path = args.input or fetch_hub_file(REPO_ID, FILENAME)
    report = Report(str(path), strict=args.strict)
    records = select(read_records(path, report, KEYS), report, categories, args.max_response_chars, args.context)
    build(args, Conversations(check_context=True), records, report, "dolly",
          source={"hub_dataset": REPO_ID, "file": FILENAME, "path": str(path), "sha256": sha256_of(path)},
          extra_meta={"subset": {"max_response_chars": args.max_response_chars,
                                 "categories": categories or "all", "context": args.context}})


if __name__ == "__main__":
    run_cli(main)
