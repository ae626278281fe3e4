"""The keyword path on hand-written prompts: bare user questions, not the recorded pools' templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from constellation.errors import InvalidArgument
from services.classifier.labels import ANSWER_KIND_OF_TASK
from services.classifier.rules import KeywordRules


@pytest.fixture(scope="module")
def rules() -> KeywordRules:
    return KeywordRules()


CASES = {
    "math": [
        "What is 17*23?",
        "A train travels at 60 miles per hour for 3 hours. How far does it go?",
        "Solve for x: 2x + 3 = 11",
        "A shirt costs $20 and is 15% off. How much does it cost after the discount?",
        "Prove that the sum of two odd integers is even.",
    ],
    "code": [
        "Write a Python function that checks whether a string is a palindrome.",
        "Why does this print undefined?\n```js\nlet x;\nconsole.log(x);\n```",
        "How do I reverse a list in Python?",
        "Implement binary search in Java.",
        "Write a SQL query that returns the ten newest orders.",
    ],
    "multiple_choice": [
        "Which planet is known as the Red Planet?\nA) Venus\nB) Mars\nC) Jupiter\nD) Saturn",
        "Which of the following is a prime number? (A) 21 (B) 23 (C) 25 (D) 27",
        "Choose the correct answer: the boiling point of water at sea level is\nA. 90 C\nB. 100 C\nC. 110 C",
    ],
    "extraction": [
        "Extract every email address from the text below.\n\nContact ana@example.com or bo@example.org.",
        "Classify the sentiment of this review as positive or negative: 'The soup was cold and bland.'",
        "Decide whether the following email is spam or not: 'You won a free cruise, click here!'",
        "Categorize these products into Electronics or Clothing: laptop, scarf, headphones.",
    ],
    "writing": [
        "Write a short poem about autumn leaves.",
        "Draft an email to my landlord asking him to fix the heating.",
        "Summarize the plot of Hamlet in three sentences.",
        "What are some tips for sleeping better?",
        "Tell me about the history of the Roman Empire.",
    ],
    "reasoning": [
        "Here is a riddle: what has keys but can't open locks?",
        "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Explain your reasoning.",
        "How many piano tuners are there in Chicago? Think step by step.",
        "Solve this sudoku for me.",
    ],
    "dialogue": [
        "Hi there!",
        "Pretend you are a pirate captain and greet me.",
        "I want you to act as a travel guide. I will tell you where I am.",
        "What do you think about modern art?",
        "As a medieval knight, what would you say to the king?",
    ],
}


@pytest.mark.parametrize(("task", "prompt"), [(t, p) for t, prompts in CASES.items() for p in prompts])
def test_task_of_hand_written_prompts(rules: KeywordRules, task: str, prompt: str) -> None:
    result = rules.classify(prompt)
    assert result.task == task, f"{prompt!r}: {result.task} ({result.fired})"
    assert result.fired, "a decided task names the rules that fired"
    assert result.answer_kind == ANSWER_KIND_OF_TASK[task]
    assert 0.0 < result.task_confidence <= 1.0


def test_unmatched_prompt_is_the_default_at_modest_confidence(rules: KeywordRules) -> None:
    result = rules.classify("zebra quantum lemonade")
    assert result.task == "writing"
    assert result.fired == ()
    assert result.task_confidence < 0.5


def test_strong_evidence_gives_high_confidence(rules: KeywordRules) -> None:
    options = "Which gas do plants absorb?\nA) Oxygen\nB) Carbon dioxide\nC) Nitrogen\nD) Helium\nAnswer:"
    assert rules.classify(options).task_confidence > 0.95
    assert rules.classify("Write a python function to add two numbers.").task_confidence > 0.9


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("What is the capital of France?", "low"),
        ("Who is the author of Hamlet?", "low"),
        ("Prove rigorously that the square root of 2 is irrational.", "high"),
        (
            "Write a function that returns the lexicographically smallest string after at most k swaps, "
            "in O(n log n) time. Handle the edge cases.",
            "high",
        ),
    ],
)
def test_complexity_cues(rules: KeywordRules, prompt: str, expected: str) -> None:
    assert rules.classify(prompt).complexity == expected


def test_output_length_cues(rules: KeywordRules) -> None:
    letter = rules.classify("Which is a mammal?\nA) Shark\nB) Whale\nPrint only the letter without explanation.")
    essay = rules.classify("Write a 1500-word essay on the causes of the First World War.")
    brief = rules.classify("Briefly, what is photosynthesis?")
    plain = rules.classify("What is photosynthesis?")
    assert letter.expected_output_tokens <= 2
    assert essay.expected_output_tokens >= 1500
    assert brief.expected_output_tokens < plain.expected_output_tokens


def test_focus_finds_the_question_in_templates(rules: KeywordRules) -> None:
    few_shot = (
        "Which is a liquid at room temperature?\nA) iron\nB) water\nAnswer:\nB\n\n"
        "What do bees make?\nA) honey\nB) milk\nAnswer:\nA\n\n"
        "Which animal can fly?\nA) eagle\nB) cow\nAnswer:"
    )
    focus, rule = rules.focus(few_shot)
    assert focus.startswith("Which animal can fly?") and "bees" not in focus and rule
    template = (
        "\n## Question: \n\nTom has 3 apples and buys 4 more. How many now?\n\n\n## Instruction \n\nAnswer in JSON."
    )
    focus, rule = rules.focus(template)
    assert focus == "Tom has 3 apples and buys 4 more. How many now?" and rule
    assert rules.focus("Just a question?") == ("Just a question?", "")


def test_huge_prompts_are_windowed(rules: KeywordRules) -> None:
    prompt = "Write a Python function to sort a list. " + "filler words " * 200_000
    result = rules.classify(prompt)
    assert result.task == "code"
    assert len(result.focus) <= rules.head_chars + rules.tail_chars + 2


def test_domain(rules: KeywordRules) -> None:
    assert rules.classify("How do I fix this bug in my Python code?").domain == "programming"
    assert rules.classify("zebra quantum lemonade").domain == ""


def test_bad_rule_files_name_the_rule(tmp_path: Path) -> None:
    bad_regex = tmp_path / "bad.toml"
    bad_regex.write_text('[[task.rule]]\nname = "broken"\ntask = "math"\nweight = 1.0\npattern = "(unclosed"\n')
    with pytest.raises(InvalidArgument, match="broken"):
        KeywordRules(bad_regex)
    bad_task = tmp_path / "task.toml"
    bad_task.write_text('[[task.rule]]\nname = "odd"\ntask = "poetry"\nweight = 1.0\nkeywords = ["x"]\n')
    with pytest.raises(InvalidArgument, match="poetry"):
        KeywordRules(bad_task)
    unknown_key = tmp_path / "key.toml"
    unknown_key.write_text('[[task.rule]]\nname = "typo"\ntask = "math"\nweight = 1.0\nkeyword = ["x"]\n')
    with pytest.raises(InvalidArgument, match="keyword"):
        KeywordRules(unknown_key)
