"""The splitter: independent lists and "and also" split; referential, few-shot and data lists stay whole."""

from __future__ import annotations

import pytest

from constellation.planning.decompose import split

SPLIT = [
    ("1. What is the capital of France?\n2. How many legs does a spider have?", 2),
    ("Answer the following questions:\n1) Who wrote Hamlet?\n2) What is 12 times 12?\n3) Name a noble gas.", 3),
    ("Q1: What is the speed of light?\nQ2: Which planet is largest?", 2),
    ("- What is DNA?\n- Why is the sky blue?", 2),
    ("What is the boiling point of water, and also who painted the Mona Lisa?", 2),
]
WHOLE = [
    "1. Compute 3 + 4.\n2. Multiply the result by 2.",
    "What is 5 squared, and also what is it doubled?",
    "1. Name a prime above 10.\n2. Then use that to compute its square.",
    "Sort these words alphabetically:\n1. apple\n2. pear\n3. fig",
    "1. What is a list?\n3. What is a set?",
    "Q: 2 + 2?\nA: 4\n\nQ: 3 + 3?\nA: 6\n\nQ: 5 + 5?\nA:",
    "Write a poem about the sea.",
    "1. Who discovered penicillin?\n2. What did the scientist above win for it?",
]


@pytest.mark.parametrize(("prompt", "parts"), SPLIT)
def test_independent_parts_are_split_in_order(prompt: str, parts: int) -> None:
    found = split(prompt)
    assert found is not None and len(found) == parts
    assert [p.index for p in found] == list(range(parts))
    assert all(p.text.lower().rstrip("?.") in prompt.lower() for p in found)


@pytest.mark.parametrize("prompt", WHOLE)
def test_referential_data_and_few_shot_prompts_stay_whole(prompt: str) -> None:
    assert split(prompt) is None
