"""Turning ranked candidates into one answer (no gRPC here; the servicer maps protobuf to these types).

* Closed answers (``number``, ``choice``): a reliability-weighted vote (:mod:`constellation.ml.vote`);
  the answer's text is that of the best-ranked candidate that voted for the winner, sent as one delta.
  Confidence is the calibrator's P(correct) (:mod:`services.fusion.calibration`), or the weighted
  share when no calibrator is loaded; ``uncertain`` is confidence below the threshold. When no
  candidate states an answer, the top candidate is returned (method ``top_candidate``), uncertain.
* Code answers: the top-ranked candidate (method ``top_candidate``): a fuser cannot merge programs
  safely, and the pools record no test harness to check a merged one.
* Open answers: generative fusion. The fuser model on Triton reads the query and the top candidates
  (:mod:`services.fusion.prompt`) and its text streams out as it is written (method ``generative``).
  On a fuser error, a timeout or an empty answer the top candidate is returned instead (method
  ``top_candidate``): the request is never lost. Leading whitespace is held back until real text
  arrives, so an empty answer streams nothing before the fallback. If the fuser fails *after* text
  has streamed, the summary carries the top candidate's text: the summary's text is the answer.

For open and code answers ``confidence`` is the chosen candidate's reliability (the caller's own
estimate, not calibrated here) and ``uncertain`` is false.

Pruned candidates (dropped by the ranker's cheap stage) neither vote nor reach the fuser, unless every
candidate was pruned.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from constellation.errors import ConstellationError
from constellation.ml.answers import CLOSED_KINDS, candidate_answer
from constellation.ml.vote import DEFAULT_WEIGHTING, Ballot, features, options_in, tally
from constellation.triton import Chunk, Sampling
from services.fusion.calibration import Calibrator
from services.fusion.prompt import fuser_prompt

log = logging.getLogger(__name__)

ANSWER_KINDS = ("number", "choice", "code", "open")


class TextGenerator(Protocol):
    """What fusion needs of a model server: :meth:`constellation.triton.TritonClient.generate`."""

    def generate(
        self, model: str, prompt: str, sampling: Sampling, *, timeout_s: float
    ) -> AsyncGenerator[Chunk, None]: ...


@dataclass(frozen=True)
class FuseCandidate:
    """One ranked candidate answer."""

    model: str
    text: str
    normalized_answer: str = ""
    reliability: float = 0.0
    rank: int = 0
    pruned: bool = False


@dataclass(frozen=True)
class FuseInput:
    """What to fuse.

    Attributes:
        prompt: The user's query.
        candidates: Ranked candidates (any order; sorted by ``rank`` here, stably).
        kind: ``number``, ``choice``, ``code`` or ``open``.
        fuser_model: Triton model for open answers; empty: the service default.
        sampling: The fuser's decoding settings (already completed with the service defaults).
    """

    prompt: str
    candidates: Sequence[FuseCandidate]
    kind: str
    fuser_model: str = ""
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Agreement:
    """How the candidates agreed on a closed answer (see the ``Agreement`` message)."""

    answer: str
    weighted_share: float
    votes_for: int
    votes_total: int


@dataclass(frozen=True)
class FuseResult:
    """The final summary of a fusion.

    Attributes:
        text: The whole answer.
        confidence: P(the answer is right) for votes; the chosen candidate's reliability otherwise.
        uncertain: The vote's confidence is below the threshold (the candidates disagree too much).
        agreement: The vote, for closed answers; None otherwise.
        method: ``vote``, ``generative`` or ``top_candidate``.
        input_tokens: Fuser prompt tokens (0 when no fuser ran).
        output_tokens: Fuser output tokens.
        cost_usd: The fuser call's cost from the configured prices.
        fallback_reason: Why the top candidate was returned, in words; empty otherwise.
    """

    text: str
    confidence: float
    uncertain: bool
    agreement: Agreement | None
    method: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    fallback_reason: str = ""


@dataclass(frozen=True)
class FuserSettings:
    """Service-wide settings of :class:`Fuser` (from :class:`~services.fusion.config.FusionConfig`)."""

    fuser_model: str = "smollm2"
    fuse_timeout_s: float = 120.0
    deadline_reserve_s: float = 0.2
    prompt_budget_chars: int = 6000
    max_fused_candidates: int = 4
    uncalibrated_threshold: float = 0.5
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    min_fuser_s: float = 0.5
    """Below this much time left, the fuser is not called at all."""


def ranked(candidates: Sequence[FuseCandidate]) -> list[FuseCandidate]:
    """Candidates by rank (stable), without the pruned ones unless all were pruned."""
    ordered = sorted(candidates, key=lambda c: c.rank)
    kept = [c for c in ordered if not c.pruned]
    return kept or ordered


class Fuser:
    """Fuses candidates. Safe for concurrent calls; holds no per-call state.

    Args:
        generator: The Triton client that serves the fuser model (shared; not closed here).
        calibrator: Confidence calibrator for votes; None: confidence is the weighted share.
        settings: Service-wide settings.
    """

    def __init__(self, generator: TextGenerator, calibrator: Calibrator | None, settings: FuserSettings):
        self.generator = generator
        self.calibrator = calibrator
        self.settings = settings

    @property
    def weighting(self) -> str:
        return self.calibrator.weighting if self.calibrator is not None else DEFAULT_WEIGHTING

    def vote(self, request: FuseInput) -> FuseResult:
        """The vote on a closed answer (microseconds; no I/O)."""
        candidates = ranked(request.candidates)
        ballots = [
            Ballot(candidate_answer(request.kind, c.normalized_answer, c.text), c.reliability, position)
            for position, c in enumerate(candidates)
        ]
        result = tally(ballots, self.weighting)
        if result.answer is None:
            top = candidates[0]
            return FuseResult(
                text=top.text,
                confidence=0.0,
                uncertain=True,
                agreement=Agreement("", 0.0, 0, 0),
                method="top_candidate",
                fallback_reason="no candidate states an answer",
            )
        if self.calibrator is not None:
            confidence = self.calibrator.confidence(features(result, request.kind, options_in(request.prompt)))
            threshold = self.calibrator.threshold
        else:
            confidence, threshold = result.weighted_share, self.settings.uncalibrated_threshold
        best = candidates[min(result.winners)]
        return FuseResult(
            text=best.text or result.answer,
            confidence=confidence,
            uncertain=confidence < threshold,
            agreement=Agreement(result.answer, result.weighted_share, result.votes_for, result.votes_total),
            method="vote",
        )

    def top_candidate(self, request: FuseInput, reason: str, *, usage: tuple[int, int] = (0, 0)) -> FuseResult:
        """The top-ranked candidate as the answer (code answers, and the fallback of generative fusion)."""
        top = ranked(request.candidates)[0]
        return FuseResult(
            text=top.text,
            confidence=top.reliability,
            uncertain=False,
            agreement=None,
            method="top_candidate",
            input_tokens=usage[0],
            output_tokens=usage[1],
            cost_usd=self._cost(*usage),
            fallback_reason=reason,
        )

    def _cost(self, input_tokens: int, output_tokens: int) -> float:
        s = self.settings
        return (input_tokens * s.price_in_per_mtok + output_tokens * s.price_out_per_mtok) / 1e6

    async def fuse(
        self, request: FuseInput, *, time_remaining_s: float | None = None
    ) -> AsyncGenerator[str | FuseResult, None]:
        """Yields text deltas, then one :class:`FuseResult` (always last, always exactly one).

        Args:
            request: What to fuse; ``kind`` must be one of :data:`ANSWER_KINDS`.
            time_remaining_s: The caller's remaining deadline in seconds (None: no deadline). The fuser
                gets ``min(fuse_timeout_s, time_remaining_s - deadline_reserve_s)``.

        Cancelling the consumer (or closing this iterator) cancels the fuser's Triton request.
        """
        if request.kind in CLOSED_KINDS:
            result = self.vote(request)
        elif request.kind == "code":
            result = self.top_candidate(request, "code answers are not merged")
        else:
            async with aclosing(self._generate(request, time_remaining_s)) as stream:
                async for item in stream:
                    yield item
            return
        if result.text:
            yield result.text
        yield result

    async def _generate(
        self, request: FuseInput, time_remaining_s: float | None
    ) -> AsyncGenerator[str | FuseResult, None]:
        s = self.settings
        model = request.fuser_model or s.fuser_model
        candidates = ranked(request.candidates)[: s.max_fused_candidates]
        budget = s.fuse_timeout_s
        if time_remaining_s is not None:
            budget = min(budget, time_remaining_s - s.deadline_reserve_s)
        streamed: list[str] = []
        usage = (0, 0)
        reason = ""
        if budget < s.min_fuser_s:
            reason = f"only {max(budget, 0.0):.2f} s left before the deadline"
        else:
            prompt, cut = fuser_prompt(request.prompt, [c.text for c in candidates], s.prompt_budget_chars)
            if cut:
                log.debug("fusion: cut %d characters of candidates to fit the prompt budget", cut)
            held = ""
            try:
                stream = self.generator.generate(model, prompt, request.sampling, timeout_s=budget)
                async with aclosing(stream) as chunks:
                    async for chunk in chunks:
                        usage = (chunk.input_tokens or usage[0], chunk.output_tokens or usage[1])
                        if streamed:
                            if chunk.text:
                                streamed.append(chunk.text)
                                yield chunk.text
                            continue
                        held += chunk.text
                        if held.strip():
                            streamed.append(held.lstrip())
                            yield streamed[0]
            except ConstellationError as error:
                reason = f"the fuser {model} failed: {error}"
            if not reason and not "".join(streamed).strip():
                reason = f"the fuser {model} wrote an empty answer"
        if reason:
            log.warning("fusion: returning the top candidate: %s", reason)
            result = self.top_candidate(request, reason, usage=usage)
            if not streamed and result.text:
                yield result.text
            yield result
            return
        yield FuseResult(
            text="".join(streamed).rstrip(),
            confidence=candidates[0].reliability,
            uncertain=False,
            agreement=None,
            method="generative",
            input_tokens=usage[0],
            output_tokens=usage[1],
            cost_usd=self._cost(*usage),
        )
