"""The keyword path: regex and keyword rules, kept as data in ``data/rules.toml``, scored log-linearly.

Each section of the rule file (task, complexity) is a small log-linear model with hand-set weights:
every class starts from a prior score, every rule whose conditions all hold adds its ``weight`` to its
class, and the confidence of the winner is its softmax probability. A strong rule (weight 5 against a
prior of 1) gives about 0.97; no rule at all gives the default class at a modest confidence, and
``fired`` is empty, which callers use to say the answer is a default rather than a decision.

A rule's conditions (all that are given must hold):

* ``keywords``: any of these whole words occurs (``min_hits`` of them when set). A list of lists means
  every inner list must have a hit (for example a verb and a noun).
* ``phrases``: any of these occurs in the lower-cased text; a list of lists as above. A phrase that is
  a single word matches that whole word only (list its inflections); a phrase of several words is a
  substring, looked for only when its first word occurs as a whole word; anything else (``a)``,
  ``key-value``... ) is a plain substring.
* ``pattern``: the regex matches at least ``min_matches`` times. It runs on the lower-cased text, or on
  the original text with ``case_sensitive = true``. Costly patterns should be guarded by a cheap
  ``keywords`` or ``phrases`` condition: those are checked first.
* ``unless_phrases`` / ``unless_pattern``: none of these occurs.
* ``min_chars`` / ``max_chars``: bounds on the length of the focus text.
* ``min_numbers``: the focus text holds at least this many numbers.
* ``tasks``: complexity and output-length rules only: the task this path decided is one of these.
* ``on``: ``"focus"`` (default) or ``"prompt"``: which text the conditions read.

*Focus* rules cut a prompt down to the query it asks: the question inside a known answer-format
template, the last example of a few-shot prompt. Rules read the focus text by default, so template
boilerplate does not vote, and the encoder embeds it, so few-shot examples do not drown the question.

Rules read at most the first ``head_chars`` and the last ``tail_chars`` characters of a prompt, so a
huge prompt costs no more than a long one. Everything here is plain Python with no I/O after loading;
a compiled :class:`KeywordRules` is immutable and safe to share between threads.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constellation.errors import InvalidArgument
from services.classifier.labels import ANSWER_KIND_OF_TASK, ANSWER_KINDS, COMPLEXITIES, TASKS

DEFAULT_RULES = Path(__file__).resolve().parent / "data" / "rules.toml"

_SEPARATORS = b'!"$%&()*,./:;<=>?@[\\]^_`{|}~\n\t\r'
_TO_SPACE = bytes.maketrans(_SEPARATORS, b" " * len(_SEPARATORS))
_CONDITION_KEYS = {
    "keywords",
    "min_hits",
    "phrases",
    "pattern",
    "min_matches",
    "case_sensitive",
    "unless_phrases",
    "unless_pattern",
    "min_chars",
    "max_chars",
    "tasks",
    "on",
    "min_numbers",
}
_NUMBER = re.compile(r"\d+(?:[.,/:]\d+)*")

_Check = Callable[["_Text", "str | None"], bool]


def _words(lower: str) -> frozenset[str]:
    """The whole words of lower-cased text: split on punctuation except ``+ # ' -`` (``c++``, ``don't``)."""
    return frozenset(lower.encode("utf-8", "ignore").translate(_TO_SPACE).decode("utf-8", "ignore").split())


class _PhraseTable:
    """Every phrase of every rule, numbered, so each text is scanned for each phrase only once."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._plain: list[tuple[str, int]] = []
        self._chars: dict[str, int] = {}
        self._char_class: re.Pattern[str] | None = None
        self._whole_words: dict[str, int] = {}
        self._by_first_word: dict[str, list[tuple[str, int]]] = {}
        self._indexed: frozenset[str] = frozenset()

    def ids(self, phrases: Sequence[str]) -> frozenset[int]:
        """Numbers the phrases (once each) and files them by how they are looked for."""
        found = []
        for phrase in phrases:
            if phrase not in self._ids:
                number = self._ids[phrase] = len(self._ids)
                parts = phrase.split(" ")
                # Words followed by a space are whole words of any text holding the phrase; the last
                # may be cut short ("named entit"). Index by the longest whole one: rarest, roughly.
                whole = [part for part in parts[:-1] if part and _words(part) == {part}]
                if len(phrase) == 1:
                    self._chars[phrase] = number
                    self._char_class = re.compile("[" + "".join(re.escape(c) for c in self._chars) + "]")
                elif len(parts) == 1 and _words(phrase) == {phrase}:
                    self._whole_words[phrase] = number
                elif whole:
                    key = max(whole, key=len)
                    self._by_first_word.setdefault(key, []).append((phrase, number))
                else:
                    self._plain.append((phrase, number))
                self._indexed = frozenset(self._by_first_word) | frozenset(self._whole_words)
            found.append(self._ids[phrase])
        return frozenset(found)

    def present(self, lower: str, words: frozenset[str]) -> frozenset[int]:
        """Ids of the phrases that occur in ``lower`` (whose whole words are ``words``)."""
        found = [number for phrase, number in self._plain if phrase in lower]
        if self._char_class is not None:
            found.extend(self._chars[c] for c in set(self._char_class.findall(lower)))
        for word in self._indexed & words:
            number = self._whole_words.get(word)
            if number is not None:
                found.append(number)
            for phrase, number in self._by_first_word.get(word, ()):
                if phrase in lower:
                    found.append(number)
        return frozenset(found)


class _Text:
    """One prompt as the rules see it: the (windowed) prompt and its focus text.

    The focus text's lower-cased copy, words and phrase hits are computed up front (nearly every rule
    reads them); the whole prompt's are computed on first use.
    """

    __slots__ = (
        "_lower_prompt",
        "_numbers",
        "_phrases",
        "_present_prompt",
        "_words_prompt",
        "focus",
        "lower_focus",
        "present_focus",
        "prompt",
        "words_focus",
    )

    def __init__(self, prompt: str, focus: str, phrases: _PhraseTable):
        self.prompt = prompt
        self.focus = focus
        self._phrases = phrases
        self.lower_focus = focus.lower()
        self.words_focus = _words(self.lower_focus)
        self.present_focus = phrases.present(self.lower_focus, self.words_focus)
        self._lower_prompt: str | None = None
        self._words_prompt: frozenset[str] | None = None
        self._present_prompt: frozenset[int] | None = None
        self._numbers = -1

    def numbers(self) -> int:
        """How many numbers the focus text holds (``1,350``, ``3/4`` and ``2.5`` count once)."""
        if self._numbers < 0:
            self._numbers = len(_NUMBER.findall(self.focus))
        return self._numbers

    def lower(self, on_focus: bool) -> str:
        if on_focus:
            return self.lower_focus
        if self._lower_prompt is None:
            self._lower_prompt = self.prompt.lower()
        return self._lower_prompt

    def words(self, on_focus: bool) -> frozenset[str]:
        if on_focus:
            return self.words_focus
        if self._words_prompt is None:
            self._words_prompt = _words(self.lower(False))
        return self._words_prompt

    def present(self, on_focus: bool) -> frozenset[int]:
        if on_focus:
            return self.present_focus
        if self._present_prompt is None:
            self._present_prompt = self._phrases.present(self.lower(False), self.words(False))
        return self._present_prompt

    def raw(self, on_focus: bool) -> str:
        return self.focus if on_focus else self.prompt


def _compile(pattern: Any, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise InvalidArgument(f"{where}: pattern must be a string")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidArgument(f"{where}: bad regex {pattern!r}: {exc}") from exc


def _groups(raw: Any, where: str, name: str) -> list[list[str]]:
    """``["a", "b"]`` (any of) or ``[["a"], ["b", "c"]]`` (each group: any of), lower-cased."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument(f"{where}: {name} must be a non-empty list")
    if all(isinstance(item, str) for item in raw):
        return [[item.lower() for item in raw]]
    if all(isinstance(item, list) and item and all(isinstance(x, str) for x in item) for item in raw):
        return [[x.lower() for x in item] for item in raw]
    raise InvalidArgument(f"{where}: {name} must be a list of strings or a list of lists of strings")


def _pattern_check(pattern: re.Pattern[str], on: bool, sensitive: bool, needed: int) -> _Check:
    if needed <= 1:
        return lambda text, task: pattern.search(text.raw(on) if sensitive else text.lower(on)) is not None
    return lambda text, task: len(pattern.findall(text.raw(on) if sensitive else text.lower(on))) >= needed


@dataclass(frozen=True)
class _Condition:
    """A rule's compiled conditions: cheap checks, then atom groups (each must hit), then costly checks.

    Atoms are the phrase table's numbers for keywords and phrases, so a group is tested with one
    C-level ``isdisjoint`` against the text's set of present atoms.
    """

    on_focus: bool
    before: tuple[_Check, ...]
    groups: tuple[frozenset[int], ...]
    unless: frozenset[int]
    after: tuple[_Check, ...]

    def holds(self, text: _Text, task: str | None) -> bool:
        for check in self.before:
            if not check(text, task):
                return False
        if self.groups or self.unless:
            present = text.present_focus if self.on_focus else text.present(False)
            for group in self.groups:
                if group.isdisjoint(present):
                    return False
            if not self.unless.isdisjoint(present):
                return False
        for check in self.after:
            if not check(text, task):
                return False
        return True


def _condition(raw: Mapping[str, Any], where: str, phrases: _PhraseTable) -> _Condition:
    """Compiles a rule's conditions."""
    on = raw.get("on", "focus")
    if on not in ("prompt", "focus"):
        raise InvalidArgument(f"{where}: on must be 'prompt' or 'focus', got {on!r}")
    on_focus = on == "focus"
    before: list[_Check] = []
    after: list[_Check] = []
    if raw.get("tasks"):
        tasks = frozenset(str(t) for t in raw["tasks"])
        before.append(lambda text, task: task in tasks)
    if raw.get("min_chars"):
        low = int(raw["min_chars"])
        before.append(lambda text, task: len(text.focus) >= low)
    if raw.get("max_chars"):
        high = int(raw["max_chars"])
        before.append(lambda text, task: len(text.focus) <= high)
    groups: list[frozenset[int]] = []
    hits = int(raw.get("min_hits", 1))
    for group in _groups(raw.get("keywords"), where, "keywords"):
        for word in group:
            if _words(word) != {word}:
                raise InvalidArgument(f"{where}: keyword {word!r} is not one word; use phrases")
        if hits > 1:
            words = frozenset(group)

            def enough_hits(text: _Text, task: str | None, words: frozenset[str] = words) -> bool:
                return len(words & text.words(on_focus)) >= hits

            after.append(enough_hits)
        else:
            groups.append(phrases.ids(group))
    for group in _groups(raw.get("phrases"), where, "phrases"):
        groups.append(phrases.ids(group))
    unless = frozenset[int]()
    if raw.get("unless_phrases"):
        unless = phrases.ids(_groups(raw["unless_phrases"], where, "unless_phrases")[0])
    if raw.get("min_numbers"):
        count = int(raw["min_numbers"])
        after.append(lambda text, task: text.numbers() >= count)
    if "unless_pattern" in raw:
        search = _compile(raw["unless_pattern"], where).search
        after.append(lambda text, task: search(text.lower(on_focus)) is None)
    if "pattern" in raw:
        pattern = _compile(raw["pattern"], where)
        sensitive = bool(raw.get("case_sensitive", False))
        after.append(_pattern_check(pattern, on_focus, sensitive, int(raw.get("min_matches", 1))))
    return _Condition(on_focus, tuple(before), tuple(groups), unless, tuple(after))


@dataclass(frozen=True)
class _Rule:
    name: str
    target: str
    weight: float
    condition: _Condition
    factor: float = 1.0
    tokens: float = 0.0


@dataclass(frozen=True)
class _LogLinear:
    """Classes, priors (optionally by task) and rules of one section.

    A rule whose conditions include a keyword/phrase group on the focus text is *gated*: it is only
    evaluated when one of that group's atoms occurs, found by one set intersection per prompt. The
    other rules are evaluated every time. The result is the same as evaluating every rule.
    """

    classes: tuple[str, ...]
    default: str
    prior: dict[str, float]
    prior_by_task: dict[str, dict[str, float]]
    rules: tuple[_Rule, ...]
    _ungated: frozenset[int] = frozenset()
    _by_atom: dict[int, tuple[int, ...]] = field(default_factory=dict)
    _gates: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        ungated: set[int] = set()
        by_atom: dict[int, list[int]] = {}
        for index, rule in enumerate(self.rules):
            condition = rule.condition
            if condition.on_focus and condition.groups:
                for atom in condition.groups[0]:
                    by_atom.setdefault(atom, []).append(index)
            else:
                ungated.add(index)
        object.__setattr__(self, "_ungated", frozenset(ungated))
        object.__setattr__(self, "_by_atom", {atom: tuple(rules) for atom, rules in by_atom.items()})
        object.__setattr__(self, "_gates", frozenset(by_atom))

    def decide(self, text: _Text, task: str | None = None) -> tuple[str, float, tuple[str, ...]]:
        scores = dict(self.prior_by_task.get(task or "", self.prior))
        candidates = set(self._ungated)
        for atom in self._gates & text.present_focus:
            candidates.update(self._by_atom[atom])
        fired = []
        for index in sorted(candidates):
            rule = self.rules[index]
            if rule.condition.holds(text, task):
                scores[rule.target] = scores.get(rule.target, 0.0) + rule.weight
                fired.append(rule.name)
        top = self.default
        peak = scores.get(top, 0.0)
        for label in self.classes:
            score = scores.get(label, 0.0)
            if score > peak:
                top, peak = label, score
        total = sum(math.exp(scores.get(c, 0.0) - peak) for c in self.classes)
        return top, 1.0 / total, tuple(fired)


@dataclass(frozen=True)
class _Focus:
    """A focus rule: ``pattern`` with a ``query`` group, or ``after_last``: the text after its last match."""

    name: str
    pattern: re.Pattern[str] | None
    after_last: re.Pattern[str] | None

    def find(self, text: str) -> str:
        if self.pattern is not None:
            match = self.pattern.search(text)
            return match.group("query").strip() if match is not None else ""
        assert self.after_last is not None
        end = -1
        for match in self.after_last.finditer(text):
            end = match.end()
        return text[end:].strip() if end >= 0 else ""


@dataclass(slots=True)
class KeywordResult:
    """What the keyword path says of one prompt. Treat as read-only.

    Attributes:
        task: One of :data:`~services.classifier.labels.TASKS`.
        task_confidence: Softmax probability of ``task`` under the rule weights, in (0, 1].
        complexity: ``low``, ``medium`` or ``high``.
        complexity_confidence: Its softmax probability.
        answer_kind: Implied by the task (``math`` -> ``number``, ...).
        answer_kind_confidence: Equal to ``task_confidence`` (the kind follows from the task).
        expected_output_tokens: The task's typical output length, scaled by length cues, in tokens.
        domain: A coarse topic (``programming``, ``finance``...), or empty when no domain keyword occurs.
        focus: The text the encoder should embed: the prompt itself unless a focus rule matched.
        fired: Names of the task rules that fired; empty means the task is the default, not a decision.
        focus_rule: Name of the focus rule that matched, or empty.
    """

    task: str
    task_confidence: float
    complexity: str
    complexity_confidence: float
    answer_kind: str
    answer_kind_confidence: float
    expected_output_tokens: float
    domain: str
    focus: str
    fired: tuple[str, ...] = ()
    focus_rule: str = ""


class KeywordRules:
    """A compiled rule file. Immutable after construction; safe to share between threads.

    :meth:`classify` takes tens of microseconds per prompt and never raises.

    Args:
        path: The TOML rule file; the packaged ``data/rules.toml`` by default.

    Raises:
        InvalidArgument: the file is not valid TOML, names an unknown class, or holds a bad regex
            (the message names the section and rule).
    """

    def __init__(self, path: Path | str = DEFAULT_RULES):
        self.path = Path(path)
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{self.path}: not valid TOML ({exc})") from exc
        self._phrases = _PhraseTable()
        limits = raw.get("limits", {})
        self.head_chars = int(limits.get("head_chars", 6000))
        self.tail_chars = int(limits.get("tail_chars", 2000))
        self._focus = tuple(self._focus_rule(rule) for rule in raw.get("focus", ()))
        self._task = self._section(raw.get("task", {}), TASKS, "task")
        self._complexity = self._section(raw.get("complexity", {}), COMPLEXITIES, "complexity")
        length = raw.get("output_tokens", {})
        self._tokens_by_task = {str(k): float(v) for k, v in length.get("by_task", {}).items()}
        self._tokens_default = float(length.get("default", 200))
        self._tokens_per_word = float(length.get("tokens_per_word", 1.35))
        self._length_rules = []
        for index, rule in enumerate(length.get("rule", ())):
            where = f"rules [output_tokens] rule {index} ({rule.get('name', '?')})"
            _check_keys(rule, {"name", "factor", "tokens"}, where)
            self._length_rules.append(
                _Rule(
                    str(rule.get("name", index)),
                    "",
                    0.0,
                    _condition(rule, where, self._phrases),
                    factor=float(rule.get("factor", 1.0)),
                    tokens=float(rule.get("tokens", 0.0)),
                )
            )
        self._words_pattern = _compile(
            length.get("words_pattern", r"\b(\d{2,5})[- ]words?\b"), "rules [output_tokens] words_pattern"
        )
        if self._words_pattern.groups < 1:
            raise InvalidArgument("rules [output_tokens] words_pattern needs a group capturing the number of words")
        self._answer_kind = {**ANSWER_KIND_OF_TASK, **raw.get("answer_kind", {})}
        for task, kind in self._answer_kind.items():
            if kind not in ANSWER_KINDS:
                raise InvalidArgument(f"rules [answer_kind]: {task} -> unknown kind {kind!r}")
        self._domain_of: dict[str, str] = {}
        self._domain_order: dict[str, int] = {}
        for rule in raw.get("domain", {}).get("rule", ()):
            domain = str(rule["domain"])
            self._domain_order.setdefault(domain, len(self._domain_order))
            for keyword in rule.get("keywords", ()):
                self._domain_of.setdefault(str(keyword).lower(), domain)
        self._domain_words = frozenset(self._domain_of)

    @staticmethod
    def _focus_rule(rule: Mapping[str, Any]) -> _Focus:
        where = f"rules [[focus]] {rule.get('name', '?')}"
        if ("pattern" in rule) == ("after_last" in rule):
            raise InvalidArgument(f"{where}: give exactly one of pattern (with a `query` group) or after_last")
        pattern = _compile(rule["pattern"], where) if "pattern" in rule else None
        if pattern is not None and "query" not in pattern.groupindex:
            raise InvalidArgument(f"{where}: pattern needs a named group `query`")
        after = _compile(rule["after_last"], where) if "after_last" in rule else None
        return _Focus(str(rule.get("name", "focus")), pattern, after)

    def _section(self, raw: Mapping[str, Any], classes: Sequence[str], name: str) -> _LogLinear:
        default = str(raw.get("default", classes[0]))
        if default not in classes:
            raise InvalidArgument(f"rules [{name}]: default {default!r} is not one of {tuple(classes)}")
        prior = {str(k): float(v) for k, v in raw.get("prior", {}).items()}
        by_task = {
            str(task): {str(k): math.log(max(float(v), 1e-6)) for k, v in rates.items()}
            for task, rates in raw.get("base_rates_by_task", {}).items()
        }
        for label in [*prior, *(c for rates in by_task.values() for c in rates)]:
            if label not in classes:
                raise InvalidArgument(f"rules [{name}]: prior for unknown class {label!r}")
        rules = []
        for index, rule in enumerate(raw.get("rule", ())):
            where = f"rules [{name}] rule {index} ({rule.get('name', '?')})"
            _check_keys(rule, {"name", name, "weight"}, where)
            target = rule.get(name)
            if target not in classes:
                raise InvalidArgument(f"{where}: {name} {target!r} is not one of {tuple(classes)}")
            rules.append(
                _Rule(
                    str(rule.get("name", f"{name}-{index}")),
                    target,
                    float(rule["weight"]),
                    _condition(rule, where, self._phrases),
                )
            )
        return _LogLinear(tuple(classes), default, prior, by_task, tuple(rules))

    def _window(self, prompt: str) -> str:
        if len(prompt) <= self.head_chars + self.tail_chars:
            return prompt
        return prompt[: self.head_chars] + "\n\n" + prompt[-self.tail_chars :]

    def focus(self, prompt: str) -> tuple[str, str]:
        """The query a prompt asks, and the name of the focus rule that found it (empty: none did).

        Without a matching rule the query is the prompt's rule window (all of it, unless it is huge).
        """
        window = self._window(prompt)
        for rule in self._focus:
            query = rule.find(window)
            if query:
                return query, rule.name
        return window, ""

    def classify(self, prompt: str) -> KeywordResult:
        """Applies every rule to one prompt."""
        window = self._window(prompt)
        focus, focus_rule = self.focus(window)
        text = _Text(window, focus, self._phrases)
        task, task_confidence, fired = self._task.decide(text)
        complexity, complexity_confidence, _ = self._complexity.decide(text, task)
        tokens = self._tokens_by_task.get(task, self._tokens_default)
        for rule in self._length_rules:
            if rule.condition.holds(text, task):
                tokens = rule.tokens if rule.tokens else tokens * rule.factor
        if task != "multiple_choice" and "word" in text.lower_focus:
            asked = self._words_pattern.search(text.lower_focus)
            if asked is not None:
                tokens = max(tokens, float(asked.group(1)) * self._tokens_per_word)
        return KeywordResult(
            task=task,
            task_confidence=task_confidence,
            complexity=complexity,
            complexity_confidence=complexity_confidence,
            answer_kind=self._answer_kind[task],
            answer_kind_confidence=task_confidence,
            expected_output_tokens=max(1.0, tokens),
            domain=self._domain(text.words(True)),
            focus=focus,
            fired=fired,
            focus_rule=focus_rule,
        )

    def _domain(self, words: frozenset[str]) -> str:
        """The domain with most keyword hits (the earlier-listed one on a tie), or empty."""
        hits: dict[str, int] = {}
        for word in self._domain_words & words:
            domain = self._domain_of[word]
            hits[domain] = hits.get(domain, 0) + 1
        if not hits:
            return ""
        return max(hits, key=lambda d: (hits[d], -self._domain_order[d]))


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed - _CONDITION_KEYS
    if unknown:
        raise InvalidArgument(f"{where}: unknown keys {sorted(unknown)}")
