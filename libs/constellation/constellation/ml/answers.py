"""Final answers of closed questions, read from a model's text (plain Python, no I/O).

A candidate usually arrives with its ``normalized_answer`` already set by whoever extracted it; when it
is empty, :func:`extract_answer` reads it from the text:

* numbers: a JSON ``"answer"`` field, else the last ``\\boxed{...}``, else the last number in the text;
* choices: an explicit ``answer is (B)`` / ``Answer: B`` / JSON ``"answer": "B"``, else a text that *is*
  a letter (``B``, ``(B)``, ``B)``, ``B.``, ``B: ...``). A leading article (``A first step ...``) or a
  refusal (``I do not ...``) is not read as a letter.

Either way the result goes through :func:`normalize_answer`, so ``"1,000.0"``
and ``"1000"`` vote together.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

CLOSED_KINDS = ("number", "choice")

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_JSON_ANSWER = re.compile(r'"answer"\s*:\s*"?\s*([^"\n}]*)', re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBERS = re.compile(_NUMBER)
_FRACTION = re.compile(r"^\s*(-?\d+)\s*/\s*(\d+)\s*$")
_CHOICE_EXPLICIT = re.compile(
    r"(?:answer\s*(?:is|:)|correct\s+(?:option|choice)\s+is|option)\s*[:\-]?\s*\(?\s*([A-J])\b(?![a-z'])",
    re.IGNORECASE,
)
_CHOICE_WHOLE = re.compile(r"^\s*\(?([A-J])\s*(?:[).:]|\s*$|\s+\()")


def normalize_answer(kind: str, answer: str | None) -> str | None:
    """A canonical form for comparing closed answers: numbers as floats, choices as upper-case letters."""
    if answer is None:
        return None
    text = answer.strip()
    if not text:
        return None
    if kind == "number":
        try:
            value = float(text.replace(",", "").replace("$", ""))
        except ValueError:
            return text
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    if kind == "choice":
        return text.upper()
    return text


def _number_from(fragment: str) -> str | None:
    """The number a short fragment states: a simple fraction is evaluated, else its first number."""
    cleaned = fragment.replace("$", "").replace("\\!", "").strip()
    fraction = _FRACTION.match(cleaned)
    if fraction and int(fraction.group(2)) != 0:
        value = Fraction(int(fraction.group(1)), int(fraction.group(2)))
        return str(value.numerator) if value.denominator == 1 else repr(float(value))
    found = _NUMBERS.search(cleaned)
    return found.group(0) if found else None


def extract_number(text: str) -> str | None:
    """The final numeric answer stated in ``text``, un-normalised; None when there is none."""
    for match in reversed(list(_JSON_ANSWER.finditer(text))):
        value = _number_from(match.group(1))
        if value is not None:
            return value
    boxed = _BOXED.findall(text)
    if boxed:
        value = _number_from(boxed[-1])
        if value is not None:
            return value
    numbers = _NUMBERS.findall(text)
    return numbers[-1] if numbers else None


def extract_choice(text: str) -> str | None:
    """The option letter (A-J) that ``text`` answers with; None when it names none."""
    json_answer = _JSON_ANSWER.search(text)
    if json_answer:
        letter = re.match(r"\s*\(?([A-J])\b", json_answer.group(1))
        if letter:
            return letter.group(1)
    explicit = _CHOICE_EXPLICIT.findall(text)
    if explicit:
        return str(explicit[-1]).upper()
    whole = _CHOICE_WHOLE.match(text)
    if whole:
        return whole.group(1)
    return None


def extract_answer(kind: str, text: str) -> str | None:
    """The normalised closed answer in ``text`` (see the module docstring); None when none is found.

    Args:
        kind: ``number`` or ``choice``; any other kind has no closed answer and gives None.
        text: The model's whole output.
    """
    if kind == "number":
        return normalize_answer(kind, extract_number(text))
    if kind == "choice":
        return normalize_answer(kind, extract_choice(text))
    return None


def candidate_answer(kind: str, normalized_answer: str, text: str) -> str | None:
    """A candidate's normalised answer: its own ``normalized_answer`` when set, else read from ``text``."""
    if normalized_answer.strip():
        if kind == "number":
            return normalize_answer(kind, extract_number(normalized_answer) or normalized_answer)
        if kind == "choice":
            return normalize_answer(kind, extract_choice(normalized_answer) or normalized_answer)
        return normalize_answer(kind, normalized_answer)
    return extract_answer(kind, text)
