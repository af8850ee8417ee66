"""The chat template: loss masks on exactly the answers, text round trip, token boundaries."""

import re

import pytest

import tokenizer
from conftest import GRAFITO_25K, needs_shared
from tokenizer import EOT, decode, encode, render, render_prompt, render_text, show_supervised

CONVERSATION = [
    ("What is 2+2?", "4"),
    ("And in words, please", "Four.\n\nThat is the answer."),
    ("Thanks!", "You're welcome — anytime."),
]


def supervised_spans(ids, mask):
    spans, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def test_mask_covers_exactly_the_answers_and_final_end_of_text():
    ids, mask = render(CONVERSATION)
    assert len(ids) == len(mask)
    spans = supervised_spans(ids, mask)
    assert [decode(s) for s in spans[:-1]] == [" 4", " Four.\n\nThat is the answer."]
    assert spans[-1][-1] == EOT and decode(spans[-1][:-1]) == " You're welcome — anytime."
    assert ids[-1] == EOT and ids.count(EOT) == 1
    unsupervised = decode([t for t, m in zip(ids, mask) if not m])
    assert unsupervised == ("### Instruction: What is 2+2?\n\n### Answer:\n\n### Instruction: And in words, please"
                            "\n\n### Answer:\n\n### Instruction: Thanks!\n\n### Answer:")


def test_decode_of_render_is_the_template_text():
    ids, _ = render(CONVERSATION)
    assert decode(ids) == render_text(CONVERSATION)
    assert render_text([("hi", "hello")]) == "### Instruction: hi\n\n### Answer: hello<|endoftext|>"


def test_segments_tokenize_like_the_whole_text():
    for conversation in (CONVERSATION, [("q", "'s fine"), ("x", "...and 42")], [("a", "1999")]):
        ids, _ = render(conversation)
        assert ids == tokenizer.get_encoding().encode(render_text(conversation), allowed_special={"<|endoftext|>"})


def test_prompt_is_the_prefix_of_the_rendered_conversation():
    ids, _ = render(CONVERSATION)
    prompt = render_prompt(CONVERSATION[:2], CONVERSATION[2][0])
    assert ids[:len(prompt)] == prompt
    assert decode(prompt).endswith("### Answer:")
    assert render_prompt([], "hi") == encode("### Instruction: hi\n\n### Answer:")


def test_empty_answer_is_refused():
    with pytest.raises(ValueError, match="empty answer"):
        render([("q", "  ")])


def test_show_supervised_marks_answer_spans():
    ids, mask = render([("hi", "hello there")])
    assert show_supervised(ids, mask, color=False) == "### Instruction: hi\n\n### Answer:[[ hello there<|endoftext|>]]"


@needs_shared
def test_real_grafito_samples_tokenize_like_the_whole_text():
    """Single-turn grafito-25k samples, split by a regex independent of prepare/: segment ids
    equal tiktoken on the full text, so the template's cuts never change BPE merges."""
    blocks = GRAFITO_25K.read_text(encoding="utf-8").split("\n\n\n")
    pairs = []
    for block in blocks[::20]:
        m = re.fullmatch(r"### Instruction: (.*?)\n\n### Answer:(.*)", block, re.S)
        if m and "###" not in m.group(2) and m.group(2).strip():
            pairs.append([(m.group(1), m.group(2))])
    assert len(pairs) > 1000
    whole = tokenizer.get_encoding().encode_batch([render_text(p) for p in pairs], allowed_special={"<|endoftext|>"})
    rendered = tokenizer.render_batch(pairs)
    assert [ids for ids, _ in rendered] == whole
