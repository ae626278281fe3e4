"""The fuser's prompt: the query and the top-ranked candidates, delimited, trimmed to fit a character budget.

The fuser plays the aggregator of a Mixture-of-Agents: it reads several answers to the same query and
writes one. The instructions ask it to judge the answers rather than copy one, to fix what is wrong
and to keep what several agree on, and not to mention that several answers existed.

Delimiting: the frame's header lines (``Question:``, ``Answer 1:`` ... ``Answer N:``, ``Your answer:``)
are the only delimiters, and nothing from outside (the query, the candidates) can produce one: every
line of outside text that reads as a header once Unicode look-alikes are folded (NFKC: fullwidth
digits and colons, for instance), whatever its case or leading space, is quoted with ``| `` and so
reads as content. A candidate that writes "Answer 2: London" therefore cannot pose as a second answer.
Per-request random boundary tokens were tried and dropped: the small fuser models copied them into
their answers (SmolLM2-135M wrote 48 tokens of marker text instead of 18 of answer).

Budgeting: the instructions are fixed; the query keeps at most a third of the budget (head and tail kept,
the middle elided); what is left is shared among the candidates by water-filling (a short candidate
keeps all of its text and leaves the rest to longer ones). A cut candidate keeps its beginning and
ends with a marker. Plain Python, no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

ELISION = " [...]"

INSTRUCTIONS = (
    "Several assistants have answered the question below. Their answers may be wrong, incomplete or "
    "contradict each other. Read them critically: keep what is correct and what they agree on, fix "
    "mistakes, and fill gaps. Then write one clear, complete answer to the question in your own words. "
    "Do not mention the assistants or that there were several answers."
)
FRAME_HEADER = re.compile(
    r"\s*[>*#_-]*\s*(?:(?:answer|response|candidate|assistant)\s*#?\s*\d*|question|your\s*answer)\s*[:.)-]",
    re.IGNORECASE,
)
"""A line of outside text that could read as one of the frame's headers (after NFKC folding)."""
QUOTE = "| "


def neutralise(text: str) -> str:
    """``text`` with every line that could read as a frame header quoted (see the module doc)."""
    # splitlines() also breaks at \r, \v, \f, \x85, \u2028...: every line a tokenizer may see starts afresh.
    return "\n".join(QUOTE + line if is_header(line) else line for line in text.splitlines())


def is_header(line: str) -> bool:
    """Whether ``line`` would read as a frame header (what :func:`neutralise` never leaves in outside text)."""
    return FRAME_HEADER.match(unicodedata.normalize("NFKC", line)) is not None


def _cut_head(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(limit - len(ELISION), 0)].rstrip() + ELISION


def _cut_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = max(limit - len(ELISION), 0)
    head = keep * 2 // 3
    return text[:head].rstrip() + ELISION + " " + text[len(text) - (keep - head) :].lstrip()


def share_budget(lengths: Sequence[int], budget: int) -> list[int]:
    """Characters each text may keep so that together they fit ``budget`` (water-filling).

    Texts shorter than an equal share keep everything; the rest split what is left equally.
    """
    allowed = [0] * len(lengths)
    remaining = max(budget, 0)
    pending = sorted(range(len(lengths)), key=lambda i: lengths[i])
    while pending:
        share = remaining // len(pending)
        index = pending[0]
        if lengths[index] <= share:
            allowed[index] = lengths[index]
            remaining -= lengths[index]
            pending.pop(0)
            continue
        for index in pending:
            allowed[index] = share
        break
    return allowed


def fuser_prompt(query: str, answers: Sequence[str], budget_chars: int) -> tuple[str, int]:
    """The fuser's prompt for ``query`` and ``answers`` (best first), at most about ``budget_chars`` long.

    Returns:
        The prompt, and how many characters of the answers were cut to fit.
    """
    question = _cut_middle(neutralise(query.strip()), max(budget_chars // 3, 200))
    frame = [INSTRUCTIONS, "", "Question:", question, ""]
    labels = [f"Answer {i + 1}:" for i in range(len(answers))]
    overhead = sum(len(line) + 1 for line in frame) + sum(len(label) + 3 for label in labels) + len("Your answer:")
    texts = [neutralise(a.strip()) for a in answers]
    allowed = share_budget([len(t) for t in texts], budget_chars - overhead)
    kept = [_cut_head(t, n) for t, n in zip(texts, allowed, strict=True)]
    cut = sum(max(len(t) - n, 0) for t, n in zip(texts, allowed, strict=True))
    body = [line for label, text in zip(labels, kept, strict=True) for line in (label, text, "")]
    return "\n".join([*frame, *body, "Your answer:"]), cut
