"""Splitting a multi-part prompt into independent sub-queries, conservatively.

:func:`split` returns the ordered parts of a prompt that asks several independent things, or None when
it should be sent whole. It recognises two shapes:

* a list: every non-blank line of the body starts a numbered (``1.``, ``2)``, ``Q3:``, ``Question 4:``)
  or bulleted (``-``, ``*``, ``•``) item or continues the previous one, numbers run 1, 2, 3... exactly,
  and the text before the first item is empty or a short lead-in that announces questions ("Answer the
  following questions:"). Any other lead-in (an instruction that the items are data for, such as "Sort
  these words:") keeps the prompt whole. Each item must read as a question on its own (it holds a
  "?", starts with a question or request word, or carries lettered options "A) ... B) ..."); lines
  without a marker continue the item above them (so a closing remark joins the last part);
* one sentence joined by "and also" whose two sides each read as a question or request.

Parts that refer to one another are never split: if any part after the first starts with a pronoun or
uses a back-reference ("it", "the result above", "then use that", "from part 1"...), the prompt stays
whole. Few-shot prompts (many worked questions then one to answer) are not lists in this sense and stay
whole. The rules favour precision: a missed split costs latency, a wrong split changes the question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PARTS = 8

_NUMBERED = re.compile(r"^\s*(?:q(?:uestion)?\s*)?(\d{1,2})\s*[.):]\s+(\S.*)$", re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*\u2022]\s+(\S.*)$")
_LEAD_IN = re.compile(
    r"^(?:please\s+)?(?:answer|solve|respond to|help me with|i have|here are|can you answer|tell me)\b"
    r"[^\n]{0,80}\b(?:questions?|problems?|tasks?|things?|parts?)\b[^\n]{0,40}[:.?]?$",
    re.IGNORECASE,
)
_AND_ALSO = re.compile(r"\s*[,;]?\s+and also\s+", re.IGNORECASE)
_REQUEST = re.compile(
    r"^(?:what|who|whom|whose|which|when|where|why|how|is|are|was|were|do|does|did|can|could|should|would|will"
    r"|name|list|give|tell|explain|describe|write|translate|compute|calculate|find|define|summari[sz]e"
    r"|convert|suggest|recommend)\b",
    re.IGNORECASE,
)
_STARTS_WITH_REFERENCE = re.compile(
    r"^(?:and\s+|then\s+|now\s+|next\s+)?(?:it|its|it's|that|this|these|those|they|them|their|he|she|his|her"
    r"|the same|the result|the answer|the latter|the former|then|next|afterwards|using|based on)\b",
    re.IGNORECASE,
)
_REFERENCE = re.compile(
    r"\b(?:the (?:result|answer|output|number|value|list|sum|total)s? "
    r"(?:above|from|of (?:the )?(?:previous|last|first))"
    r"|(?:the|that|this) (?:\w+ ){0,2}above|previous(?:ly)?|preceding|aforementioned|the same (?:one|thing|number)"
    r"|(?:use|using|take|multiply|divide|add|subtract|square|double|halve|translate|summari[sz]e|rewrite|sort"
    r"|reverse|compare) (?:it|them|that|this|those|these|the result|the answer)\b|(?:part|question|step|item)"
    r" (?:#)?\d|then use|from (?:it|that|this))\b",
    re.IGNORECASE,
)
_HEAD_REFERENCE = re.compile(
    r"\b(?:it|its|them|they|their|he|she|him|his|her|(?:that|this|those|these) \w+)\b", re.IGNORECASE
)
_FIRST_SENTENCE = re.compile(r"^.*?(?:[.?!](?=\s)|$)", re.DOTALL)
_ANTECEDENT = re.compile(r"\b(?:a|an|the|some|each|every|\d+)\s+\w+|\b[A-Z][a-z]+")
_OPTIONS = re.compile(r"(?:^|\s)A\)\s.+\sB\)\s", re.DOTALL)


@dataclass(frozen=True)
class Part:
    """One sub-query: its position (0-based) and its text, stripped."""

    index: int
    text: str


def refers_back(text: str) -> bool:
    """Whether a later part leans on something said before it.

    True for a pronoun lead ("It ..."), a third-person pronoun or a demonstrative ("that number") in
    the part's first sentence with no noun phrase or name before it in that sentence ("what is it
    doubled?", but not "Henry rode his bike"; later sentences may refer to the part's own first one,
    as word problems do), or a back-reference anywhere ("the result above", "then use that", "from
    part 1").
    """
    stripped = text.strip()
    first = _FIRST_SENTENCE.match(stripped)
    head = first.group(0) if first else stripped
    if _STARTS_WITH_REFERENCE.match(stripped) or _REFERENCE.search(stripped):
        return True
    return any(not _has_antecedent(head[: m.start()]) for m in _HEAD_REFERENCE.finditer(head))


def _has_antecedent(prefix: str) -> bool:
    """Whether the words before a pronoun name something it can stand for (a noun phrase or a name)."""
    for match in _ANTECEDENT.finditer(prefix):
        if not _REQUEST.match(match.group(0)) and match.group(0) not in ("If", "When", "In", "On", "At", "For", "I"):
            return True
    return False


def _items(lines: list[str]) -> tuple[str, list[str]] | None:
    """(lead-in, items) of a list-shaped prompt, or None."""
    lead: list[str] = []
    items: list[list[str]] = []
    kind: str | None = None
    for line in lines:
        numbered, bullet = _NUMBERED.match(line), _BULLET.match(line)
        if numbered and kind in (None, "numbered") and int(numbered.group(1)) == len(items) + 1:
            kind = "numbered"
            items.append([numbered.group(2)])
        elif bullet and kind in (None, "bullet"):
            kind = "bullet"
            items.append([bullet.group(1)])
        elif numbered or bullet:
            return None  # a list marker out of sequence or of the other kind: not a plain list
        elif items:
            items[-1].append(line.strip())
        else:
            lead.append(line.strip())
    if not 2 <= len(items) <= MAX_PARTS:
        return None
    return " ".join(lead), [" ".join(i) for i in items]


def _split_list(prompt: str) -> list[str] | None:
    lines = [line for line in prompt.strip().splitlines() if line.strip()]
    found = _items(lines)
    if found is None:
        return None
    lead, items = found
    if lead and not _LEAD_IN.match(lead):
        return None
    if any(len(item) > 1500 or len(item.split()) < 3 for item in items):
        return None
    if not all("?" in item or _REQUEST.match(item) or _OPTIONS.search(item) for item in items):
        return None
    return items


def _split_and_also(prompt: str) -> list[str] | None:
    text = prompt.strip()
    if "\n" in text or len(text) > 600:
        return None
    pieces = _AND_ALSO.split(text)
    if len(pieces) != 2:
        return None
    first, second = pieces[0].strip().rstrip(",;"), pieces[1].strip()
    if len(first.split()) < 2 or len(second.split()) < 2 or re.search(r"[.?!]\s", first):
        return None  # too short, or the first side is more than one sentence
    if not (_REQUEST.match(first) and _REQUEST.match(second)):
        return None
    if not first.endswith(("?", ".", "!")):
        first += "?" if second.endswith("?") else "."
    return [first, second[0].upper() + second[1:]]


def split(prompt: str) -> list[Part] | None:
    """The ordered independent parts of ``prompt``, or None to send it whole (see the module docstring)."""
    parts = _split_list(prompt) or _split_and_also(prompt)
    if parts is None or any(refers_back(p) for p in parts[1:]):
        return None
    return [Part(i, text.strip()) for i, text in enumerate(parts)]
