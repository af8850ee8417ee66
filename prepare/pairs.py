"""Preference pairs, the second kind of dataset pipeline.build() makes: a record's shared
conversation and its two final answers, cleaned, cut to fit block_size and split by prompt,
written as data.pair_rows lays them out (the format: data.py).

Parsers (hh_rlhf.py, chat.py --pairs) turn both transcripts of a record into turns and hand
them to pair_from_turns(), which makes the Pair when they are one conversation up to the
last answer.
"""

import json
from dataclasses import dataclass, replace

from pipeline import (ROLE_MARKER, Kind, Outcome, Seen, _drop_reason, admit, clean_turns, dedup_key, digest,  # first: it
                      in_val)  # puts the repository root on sys.path

import data  # noqa: E402
import tokenizer  # noqa: E402
from common import GrafitoError  # noqa: E402


@dataclass
class Pair:
    """A preference record: the conversation both transcripts share, and their two final answers."""
    line: object  # where the record starts in the source: its line (1-based), or "file:line"
    history: list  # [(instruction, answer), ...] before the last instruction
    instruction: str  # the last instruction, which both final answers answer
    chosen: str
    rejected: str

    def turns(self, answer):
        return self.history + [(self.instruction, answer)]


def pair_from_turns(line, chosen, rejected, report):
    """The Pair of two transcripts ([(instruction, answer), ...]) that are the same conversation
    up to their last answer, as written or once cleaned; else a counted skip and None."""
    prompt, rejected_prompt = chosen[:-1] + [(chosen[-1][0], "")], rejected[:-1] + [(rejected[-1][0], "")]
    if prompt != rejected_prompt and clean_turns(prompt)[0] != clean_turns(rejected_prompt)[0]:
        report.skip("chosen_and_rejected_differ_before_last_answer", line)
        return None
    return Pair(line, chosen[:-1], chosen[-1][0], chosen[-1][1], rejected[-1][1])


class Pairs(Kind):
    """Preference pairs: two rows per pair, only the final answers supervised."""
    name = "pairs"
    item = "pair"
    series = ("row_length", "prompt_length", "answer_length")

    def process(self, pairs, settings):
        cleaned = [clean_pair(pair) for pair in pairs]
        fitted = iter(fit_pairs([pair for pair, _, drop, _ in cleaned if not drop], settings.block_size,
                                settings.overlong))
        outcomes = []
        for pair, (clean, repairs, drop, keys) in zip(pairs, cleaned):
            outcome = Outcome(pair.line, repairs, drop, keys)
            if not drop:
                cut, prompt, chosen, rejected, outcome.fit_repair, outcome.fit_drop = next(fitted)
                if not outcome.fit_drop:
                    outcome.val = pair_in_val(clean, settings.val_fraction, settings.seed)
                    outcome.rows = data.pair_rows(prompt, chosen, rejected)
                    outcome.turns = len(cut.history) + 1
                    outcome.lengths = {"row_length": [len(prompt) + len(chosen), len(prompt) + len(rejected)],
                                       "prompt_length": [len(prompt)], "answer_length": [len(chosen), len(rejected)]}
            outcomes.append(outcome)
        return outcomes


def clean_pair(pair):
    """(cleaned pair, repairs, the rule it breaks or None, duplicate keys): both transcripts
    normalised, the chosen one held to every SFT rule, the rejected answer only to the
    format's (a rejected answer that parrots the instruction or has no words is what the pair
    teaches against); a pair without a preference breaks a rule too."""
    chosen, changed = clean_turns(pair.turns(pair.chosen))
    rejected, rejected_changed = clean_turns(pair.turns(pair.rejected))
    reason = _drop_reason(chosen, False) or _rejected_drop_reason(rejected[-1][1])
    if not reason and tokenizer.squash(chosen[-1][1]) == tokenizer.squash(rejected[-1][1]):
        reason = "same_answers_up_to_case_or_punctuation"  # nothing to prefer
    cleaned = Pair(pair.line, chosen[:-1], chosen[-1][0], chosen[-1][1], rejected[-1][1])
    keys = (digest(json.dumps([chosen, cleaned.rejected])),
            digest(f"{dedup_key(chosen)}\x1d{tokenizer.squash(cleaned.rejected)}"))
    return cleaned, sorted(changed | rejected_changed), reason, keys


def _rejected_drop_reason(answer):
    if not answer:
        return "empty_answer"
    if ROLE_MARKER.search(answer):
        return "role_marker_inside_text"
    return None


def pair_in_val(pair, fraction, seed):
    """in_val by the whole prompt (before any cut): pairs that share a prompt share a split."""
    return in_val(pair.turns(""), fraction, seed)


def fit_pairs(pairs, block_size, overlong):
    """(pair, prompt ids, chosen answer ids, rejected answer ids, repair, drop) per pair, each
    answer ending with <|endoftext|>. A pair with a row over block_size loses its oldest turns
    until both rows fit (overlong='truncate'; both final answers stay whole), or is dropped
    (then the ids are None)."""
    rendered = tokenizer.render_batch([turns for p in pairs for turns in (p.turns(p.chosen), p.turns(p.rejected))])
    out = []
    for k, pair in enumerate(pairs):
        chosen, rejected = rendered[2 * k], rendered[2 * k + 1]
        longest, cut = max(len(chosen[0]), len(rejected[0])), False
        while overlong == "truncate" and pair.history and longest > block_size:
            pair = replace(pair, history=pair.history[1:])
            chosen, rejected = tokenizer.render_batch([pair.turns(pair.chosen), pair.turns(pair.rejected)])
            longest, cut = max(len(chosen[0]), len(rejected[0])), True
        if longest > block_size:
            out.append((pair, None, None, None, None, "longer_than_block_size"))
            continue
        out.append((pair, *split_pair(pair, chosen, rejected), "oldest_turns_cut_to_fit_block_size" if cut else None, None))
    return out


def split_pair(pair, chosen, rejected):
    """(prompt ids, chosen answer ids, rejected answer ids) from the two rendered rows, whose
    final answers (with their end-of-text) are the last run of supervised tokens."""
    halves = []
    for ids, mask in (chosen, rejected):
        answer_start = len(mask) - mask[::-1].index(0)
        halves.append((ids[:answer_start], ids[answer_start:]))
    (prompt, chosen_answer), (rejected_prompt, rejected_answer) = halves
    if prompt != rejected_prompt:  # render() encodes a prompt apart from its answer, so this cannot differ
        raise GrafitoError(f"line {pair.line}: the chosen and the rejected row do not start with the same prompt "
                           f"ids; tokenizer.render no longer cuts a prompt from its answer")
    return prompt, chosen_answer, rejected_answer


# ----------------------------------------------------------------------------- the steps alone, for a list

def clean_pairs(pairs, report):
    """The cleaning step alone: cleaned pairs, without those that break a rule or repeat one kept."""
    kept, seen = [], Seen()
    for pair in pairs:
        cleaned, repairs, drop, keys = clean_pair(pair)
        if admit(Outcome(pair.line, repairs, drop, keys), report, seen):
            kept.append(cleaned)
    return kept


def tokenize_pairs(pairs, block_size, overlong, report):
    """The fitting step alone: (pair, prompt ids, chosen answer ids, rejected answer ids) per
    pair that fits block_size (cut as fit_pairs says)."""
    out = []
    for pair, prompt, chosen, rejected, repair, drop in fit_pairs(pairs, block_size, overlong):
        if drop:
            report.drop(drop, pair.line)
            continue
        if repair:
            report.repair(repair, pair.line)
        out.append((pair, prompt, chosen, rejected))
    return out
