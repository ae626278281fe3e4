"""Per-candidate checks of the cheap first stage: the closed answer a text gives, and whether its form fits.

Plain Python (``re``, ``ast``), no I/O; every function is pure and thread-safe.

* :func:`closed_answer` finds the final answer of a number or choice candidate: the caller's
  ``normalized_answer`` when given, else one read from the text (a JSON ``"answer"`` field, a
  ``\\boxed{}``, "the answer is ...", else the last number / a lone letter), normalised with
  :func:`constellation.ml.answers.normalize_answer` so that ``"1,000"`` and ``"1000.0"`` agree.
* :func:`format_score` says in [0, 1] how well a text has the shape its answer kind asks for: a number
  can be read (number), a letter can be read (choice), the code parses with :mod:`ast` and defines
  something (code), the text is non-empty and does not stop mid-sentence (open).
"""

from __future__ import annotations

import ast
import re

from constellation.ml.answers import normalize_answer

ANSWER_KINDS = ("number", "choice", "code", "open")
CLOSED_KINDS = ("number", "choice")

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_JSON_ANSWER = re.compile(r'"answer"\s*:\s*"?\s*([^"\n}]*)', re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:\-]?\s*\(?\$?([^\s().,;]+)", re.IGNORECASE)
_NUMBERS = re.compile(_NUMBER)
_LONE_LETTER = re.compile(r"^\s*\(?([A-Ea-e])\)?\s*(?:[.:)]|$)")
_LETTER_IS = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*\(?([A-E])\b\)?", re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\s*\n(.*?)(?:```|\Z)", re.DOTALL)
_SENTENCE_END = (*".!?)]}\"'`*:;>|", "\u3002", "\u201d", "\u2019")


def _first_number(text: str) -> str | None:
    found = _NUMBERS.search(text)
    return found.group(0) if found else None


def _number_from_text(text: str) -> str | None:
    for pattern in (_JSON_ANSWER, _BOXED):
        match = pattern.search(text)
        if match:
            number = _first_number(match.group(1))
            if number is not None:
                return number
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        number = _first_number(matches[-1].group(1))
        if number is not None:
            return number
    numbers = _NUMBERS.findall(text)
    return numbers[-1] if numbers else None


def _letter_from_text(text: str) -> str | None:
    match = _LONE_LETTER.match(text)
    if match:
        return match.group(1).upper()
    matches = list(_LETTER_IS.finditer(text))
    return matches[-1].group(1).upper() if matches else None


def closed_answer(kind: str, text: str, normalized_answer: str = "") -> str | None:
    """The normalised final answer of a number or choice candidate, or None when none can be read.

    Args:
        kind: ``number`` or ``choice``; any other kind has no closed answer (None).
        text: The candidate's full text.
        normalized_answer: The answer the caller already extracted; preferred over the text when non-empty.
    """
    if kind not in CLOSED_KINDS:
        return None
    given = normalized_answer.strip()
    if given:
        return normalize_answer(kind, given)
    raw = _number_from_text(text) if kind == "number" else _letter_from_text(text)
    if raw is None:
        return None
    return normalize_answer(kind, raw.replace("$", "").replace(",", "") if kind == "number" else raw)


def code_block(text: str) -> str:
    """The first fenced code block of ``text`` (an unclosed fence runs to the end), else ``text`` itself."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def code_score(text: str) -> float:
    """1.0: the code parses and defines a function or class; 0.75: it parses once a truncated last line
    or two are dropped; 0.5: it parses but defines nothing; 0.25: ``def`` appears but nothing parses; 0."""
    source = code_block(text).replace("\r\n", "\n")
    defines = re.search(r"^\s*(?:async\s+)?(?:def|class)\s+\w+", source, re.MULTILINE) is not None
    if _parses(source):
        return 1.0 if defines else 0.5
    lines = source.rstrip().split("\n")
    for drop in (1, 2):
        if len(lines) <= drop:
            break
        kept = lines[:-drop]
        indent = len(kept[-1]) - len(kept[-1].lstrip())
        # A cut often leaves a block header without its body: close it to see whether the rest parses.
        if _parses("\n".join(kept)) or _parses("\n".join([*kept, " " * (indent + 4) + "pass"])):
            return 0.75 if defines else 0.5
    return 0.25 if defines else 0.0


def open_score(text: str) -> float:
    """1.0 for a non-empty text ending like a finished sentence (or a closed list, table or code fence),
    0.5 when it stops mid-sentence, 0 when empty."""
    stripped = text.rstrip()
    if not stripped:
        return 0.0
    if stripped.endswith(_SENTENCE_END) or (stripped.count("```") % 2 == 0 and stripped.endswith("```")):
        return 1.0
    last_line = stripped.rsplit("\n", 1)[-1].lstrip()
    if re.match(r"^(?:[-*+]|\d+[.)])\s", last_line) and len(last_line) < 120:
        return 0.75  # a short list item: lists often end without a full stop
    return 0.5


def format_score(kind: str, text: str, normalized_answer: str = "") -> float:
    """How well ``text`` has the form ``kind`` asks for, in [0, 1] (1 = well formed).

    Args:
        kind: One of :data:`ANSWER_KINDS`; unknown kinds are checked as ``open``.
        text: The candidate's full text.
        normalized_answer: The caller's extracted answer, if any (number and choice only).
    """
    if kind in CLOSED_KINDS:
        if not text.strip() and not normalized_answer.strip():
            return 0.0
        return 1.0 if closed_answer(kind, text, normalized_answer) is not None else 0.25
    if kind == "code":
        return code_score(text)
    return open_score(text)
