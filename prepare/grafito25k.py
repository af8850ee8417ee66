"""Prepare grafito-25k, the original grafito instruction set, into data/grafito25k.

    python prepare/grafito25k.py                                   # download (pinned commit, sha256 checked)
    python prepare/grafito25k.py --input ../shared/data/grafito-25k  # a local copy

Samples are separated by two or more blank lines; each holds one or more turns of
'### Instruction: ...' then '### Answer: ...' (answers may span lines), kept together as
one conversation.
"""

import re

from pipeline import Conversations, Record, Report, build, check_args, parser  # puts the root on sys.path
from sources import fetch_url, sha256_of

from common import GrafitoError, run_cli

URL = "https://raw.githubusercontent.com/appvoid/grafito/48656aed45061217d613b46dadef972ae5d44fed/grafito-25k"
SHA256 = "7602e0620a3bf29e10f5041500306f316432f121664d04100e1316317984ef14"
SAMPLE_SEPARATOR = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
MARKER = re.compile(r"(?m)^### (Instruction|Answer):")
STRAY_INSTRUCTION = re.compile(r"\s*### Instruction:")


def parse(text, report):
    """Records from the whole file; malformed samples are counted skips (or errors with --strict)."""
    records, start, line = [], 0, 1
    for separator in [*SAMPLE_SEPARATOR.finditer(text), None]:
        end = separator.start() if separator else len(text)
        block = text[start:end]
        if block.strip():
            report.read += 1
            record = parse_sample(block, line + _leading_newlines(block), report)
            if record:
                records.append(record)
        if separator:
            line += text.count("\n", start, separator.end())
            start = separator.end()
    if report.read == 0:
        raise GrafitoError(f"{report.source}: no samples (empty file)")
    if not records:
        raise GrafitoError(f"{report.source}: no '### Instruction:' / '### Answer:' samples; is this grafito-25k?")
    return records


def _leading_newlines(block):
    return len(block) - len(block.lstrip("\n"))


def parse_sample(block, line, report):
    markers = list(MARKER.finditer(block))
    if not markers or block[:markers[0].start()].strip():
        report.skip("text_outside_a_turn", line, block.strip()[:60])
        return None
    parts, repairs = [], []  # repairs are counted only for a sample that is kept
    for m, following in zip(markers, [*markers[1:], None]):
        body = block[m.end():following.start() if following else len(block)]
        if m.group(1) == "Answer" and STRAY_INSTRUCTION.match(body):
            body = STRAY_INSTRUCTION.sub("", body, count=1)  # '### Answer: ### Instruction: text'
            repairs.append("answer_began_with_instruction_marker")
        parts.append((m.group(1), body.strip()))
    kinds = [kind for kind, _ in parts]
    if kinds[-1] == "Instruction" and kinds.count("Instruction") == kinds.count("Answer") + 1:
        if len(parts) == 1:
            report.skip("instruction_without_answer", line)
            return None
        parts, kinds = parts[:-1], kinds[:-1]  # the answered turns before it are whole: keep them
        repairs.append("unanswered_last_instruction_removed")
    if kinds != ["Instruction", "Answer"] * (len(kinds) // 2) or len(kinds) % 2:
        report.skip("turns_do_not_alternate", line, " ".join(kinds))
        return None
    for reason in repairs:
        report.repair(reason, line)
    return Record(line, [(parts[i][1], parts[i + 1][1]) for i in range(0, len(parts), 2)])


def main():
    p = parser("Prepare grafito-25k (instruction/answer samples) into token bins.", "grafito25k", 1024)
    p.add_argument("--no_detokenize", action="store_true",
                   help="keep the Penn Treebank spacing of the Natural Questions answers ( `` x '' , ( y ) )")
    p.add_argument("--keep_missing_context", action="store_true",
                   help="keep samples whose instruction asks about a passage the file does not include")
    args = p.parse_args()
    check_args(args)
    path = args.input or fetch_url(URL, SHA256, "grafito-25k")
    digest = sha256_of(path)
    if args.input and digest != SHA256:
        print(f"note: {path} is not the pinned grafito-25k (sha256 {digest[:12]}...), preparing it anyway")
    report = Report(str(path), strict=args.strict)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GrafitoError(f"{path}: not UTF-8 text ({err})") from None
    records = parse(text, report)
    kind = Conversations(detokenize=not args.no_detokenize, check_context=not args.keep_missing_context)
    build(args, kind, records, report, "grafito25k", source={"url": URL, "path": str(path), "sha256": digest})


if __name__ == "__main__":
    run_cli(main)
