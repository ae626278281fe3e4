"""Classifier configuration (``[classifier]`` in the config file, ``CONSTELLATION_CLASSIFIER_*`` variables)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from constellation.config import ServiceConfig


class ClassifierConfig(ServiceConfig):
    """Settings of the classifier service.

    Attributes:
        port: gRPC port of ClassifierService (50052 by default).
        policy: ``hybrid`` (rules when confident, else the trained heads), ``keyword`` or ``encoder``.
        keyword_min_confidence: Rule task confidence at or above which the hybrid policy keeps the
            rules' task without asking the heads. 0.6 was chosen by 4-fold cross-validation on the train
            splits: hybrid task accuracy is flat (98.5%) from 0.5 to 0.6 and falls to 97.5% at 0.9, while
            the share of prompts sent to the encoder grows from 8% to 16%.
        keyword_min_complexity_confidence: Rule complexity confidence at or above which the hybrid
            policy keeps the rules' complexity even when the heads ran (above 1: never).
        artifact: Trained heads: an artifact directory, or a directory holding ``CURRENT``. Empty: the
            current one under ``$CONSTELLATION_CACHE_DIR/artifacts`` (``~/.cache/constellation/artifacts``).
            When none is there the service runs on the keyword rules alone and says so.
        encoder: Load all-MiniLM-L6-v2 (needed for embeddings and the heads). False: rules only, no
            embeddings, no torch in the process.
        encoder_runtime: ``torch`` (the default), ``onnx`` (ONNX Runtime fp32: torch's embeddings within
            float rounding, the same CPU per query) or ``onnx-int8`` (ONNX Runtime with int8 weights: about
            a third of the classifier's CPU per routed request and 5 ms p50 per query instead of 17 on a busy
            2-core host, embeddings within 0.99 cosine of fp32). int8 is not the default because it changes
            routing: the router's train embeddings are torch fp32, and gsm8k's eval moved by 3 of 425 prompts
            for both profiles (-0.71 points, -4% cost for balanced); use it with a router trained on int8
            embeddings. The ONNX graph is exported from the installed package's weights at first use and
            cached (``constellation.ml.onnx_encoder``).
        encoder_threads: encoder intra-op threads for the encoder (process-wide). 1 by default: the event
            loop and gRPC threads need the other core, and on a shared machine extra OpenMP threads spin
            against other work (on a busy 2-core host, 2 threads ran 2-20x slower than 1). Raise it on a
            dedicated host with cores to spare; 0 leaves torch's default (one per core).
        rules_file: Keyword rule file; empty means the packaged ``data/rules.toml``.
        batch_max_size: Most prompts per encoder run.
        batch_max_wait_ms: How long the batcher lingers for more prompts while the service is busy, in
            milliseconds (an idle service never waits).
        queue_max: Most prompts waiting for the encoder; beyond it calls fail with RESOURCE_EXHAUSTED.
        max_prompt_chars: Longest prompt accepted, in characters (longer: INVALID_ARGUMENT). Prompts far
            shorter than this are still cut to fit the encoder, and flagged ``truncated``.
        max_batch_requests: Most prompts in one ClassifyBatch call (more: INVALID_ARGUMENT naming the
            limit). A batch is encoded ``batch_max_size`` prompts at a time, so single Classify calls keep
            flowing while it runs; the limit bounds how long one call holds the encoder (a 1,024-prompt
            batch held it for 25 s on a busy 2-core host).
    """

    service_name: ClassVar[str] = "classifier"
    model_config = SettingsConfigDict(env_prefix="CONSTELLATION_CLASSIFIER_", env_nested_delimiter="__", extra="forbid")

    port: int = Field(default=50052, ge=0, le=65535)
    policy: Literal["hybrid", "keyword", "encoder"] = "hybrid"
    keyword_min_confidence: float = Field(default=0.6, ge=0.0, le=1.0)
    keyword_min_complexity_confidence: float = Field(default=1.1, ge=0.0)
    artifact: str = ""
    encoder: bool = True
    encoder_runtime: Literal["onnx-int8", "onnx", "torch"] = "torch"
    encoder_threads: int = Field(default=1, ge=0, le=256)
    rules_file: str = ""
    batch_max_size: int = Field(default=64, ge=1, le=1024)
    batch_max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    queue_max: int = Field(default=4096, ge=1)
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    max_batch_requests: int = Field(default=256, ge=1, le=4096)
