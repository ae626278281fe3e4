"""Runs the classifier service: ``python -m services.classifier.main`` (or ``constellation serve classifier``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from constellation.errors import ConstellationError
from constellation.ml.encoder import DEFAULT_HEAD_TOKENS, DEFAULT_MAX_TOKENS, BaseEncoder, Encoder
from constellation.server import Registration, RunningServer, serving
from constellation.service import Flag, ServiceMain, disable, optional_artifact
from constellation.v1 import classifier_pb2_grpc
from services.classifier.classify import Classifier, Policy
from services.classifier.config import ClassifierConfig
from services.classifier.heads import Artifact, default_artifact_root, load_artifact
from services.classifier.rules import DEFAULT_RULES, KeywordRules
from services.classifier.servicer import SERVICE_NAME, ClassifierServicer

log = logging.getLogger(__name__)


SHIPPED_ARTIFACT_ROOT = Path(__file__).resolve().parent / "data" / "artifacts"
"""Heads trained on the recorded pools' train splits that ship with the project (1.6 MB; reproduce
with ``constellation train classifier``): used when neither the config nor the cache names any."""


def _artifact_root() -> Path:
    """The cache's artifacts root when it holds trained heads, else the shipped ones."""
    root = default_artifact_root()
    return root if (root / "classifier" / "CURRENT").is_file() else SHIPPED_ARTIFACT_ROOT


def _load_artifact(config: ClassifierConfig) -> Artifact | None:
    without = "serving with the keyword path only (decided_by=keyword)"
    artifact = optional_artifact("classifier", load_artifact, config.artifact, _artifact_root, without)
    if artifact is not None:
        log.info("classifier: loaded heads %s from %s", artifact.content_hash[:12], artifact.path)
    return artifact


def _load_encoder(config: ClassifierConfig, max_tokens: int, head_tokens: int, quantized: bool) -> BaseEncoder:
    """The encoder ``config.encoder_runtime`` names; torch when ONNX Runtime cannot run here.

    Heads trained on torch's int8 embeddings (``quantized``) get torch's int8 encoder: ONNX Runtime's int8
    embeddings differ from those.
    """
    if config.encoder_runtime != "torch" and not quantized:
        from constellation.ml.onnx_encoder import OnnxEncoder

        try:
            return OnnxEncoder(
                max_tokens=max_tokens,
                head_tokens=head_tokens,
                int8=config.encoder_runtime == "onnx-int8",
                threads=config.encoder_threads or None,
            )
        except ConstellationError as error:
            log.warning("classifier: %s; falling back to the torch encoder", error.message)
    threads = config.encoder_threads or None
    return Encoder(max_tokens=max_tokens, head_tokens=head_tokens, quantize=quantized, threads=threads)


def build_classifier(config: ClassifierConfig, *, encoder: BaseEncoder | None = None) -> Classifier:
    """Loads the rules, the encoder and the trained heads for ``config``. Blocking (seconds, most of it
    importing torch); call it off the event loop.

    A missing artifact or encoder package is not an error: the classifier then runs on the rules
    alone, and the reason is logged as a warning.

    Args:
        config: Service settings.
        encoder: An encoder already loaded (tests share one); used when ``config.encoder`` is true and
            its settings match the artifact's.
    """
    rules = KeywordRules(config.rules_file or DEFAULT_RULES)
    artifact = None
    if not config.encoder:
        log.warning("classifier: the encoder is disabled (encoder=false): keyword path only, no embeddings")
        encoder = None
    else:
        artifact = _load_artifact(config)
        settings = artifact.manifest["encoder"] if artifact is not None else {}
        wanted = (
            int(settings.get("max_tokens", DEFAULT_MAX_TOKENS)),
            int(settings.get("head_tokens", DEFAULT_HEAD_TOKENS)),
            bool(settings.get("quantized", False)),
        )
        if encoder is not None and (encoder.max_tokens, encoder.head_tokens, encoder.quantized) != wanted:
            encoder = None
        try:
            if encoder is None:
                encoder = _load_encoder(config, *wanted)
        except ConstellationError as error:
            log.warning("classifier: %s; serving without embeddings, keyword path only", error.message)
            artifact = None
        if encoder is not None and artifact is not None:
            trained = artifact.manifest["encoder"].get("weights_sha256")
            if trained != encoder.identity.weights_sha256:
                log.warning(
                    "classifier: heads %s were trained on encoder weights %s, these are %s; retrain",
                    artifact.content_hash[:12],
                    trained,
                    encoder.identity.weights_sha256,
                )
            if artifact.manifest.get("rules_sha256") not in (None, rules.sha256):
                log.info("classifier: the rule file changed since training; focus texts may differ slightly")
    classifier = Classifier(
        rules,
        encoder=encoder,
        artifact=artifact,
        policy=Policy(config.policy, config.keyword_min_confidence, config.keyword_min_complexity_confidence),
        max_batch=config.batch_max_size,
        max_wait_s=config.batch_max_wait_ms / 1000.0,
        max_queue=config.queue_max,
    )
    log.info("classifier: %s", classifier.description)
    return classifier


def registrations(classifier: Classifier, config: ClassifierConfig) -> list[Registration]:
    return [
        Registration(
            ClassifierServicer(classifier, config),
            classifier_pb2_grpc.add_ClassifierServiceServicer_to_server,  # type: ignore[arg-type]
            SERVICE_NAME,
        )
    ]


@asynccontextmanager
async def running_classifier(
    config: ClassifierConfig, *, classifier: Classifier | None = None
) -> AsyncIterator[RunningServer]:
    """The classifier's lifespan: builds (or takes) the classifier, starts its batcher, serves, stops both.

    Args:
        config: Service settings; port 0 picks a free one.
        classifier: A ready classifier to serve (tests share one to load the encoder once); built from
            ``config`` off the event loop when None. A classifier passed in is started but not closed here.
    """
    async with AsyncExitStack() as stack:
        if classifier is None:
            classifier = await asyncio.to_thread(build_classifier, config)
            stack.push_async_callback(classifier.close)
        classifier.start()
        yield await stack.enter_async_context(serving(registrations(classifier, config), config))


SERVICE = ServiceMain(
    name="classifier",
    config=ClassifierConfig,
    description="Run the classifier service (ClassifierService/Classify and ClassifyBatch): task type, "
    "complexity, expected output length, answer kind and the query embedding. Settings come from the "
    "[classifier] table of the config file and CONSTELLATION_CLASSIFIER_* variables; flags override both. "
    "Train the heads first with `constellation train classifier`; without them the keyword rules decide.",
    lifespan=running_classifier,
    flags=(
        Flag("--artifact", help="trained heads: an artifact directory or one holding CURRENT"),
        Flag(
            "--policy",
            choices=["hybrid", "keyword", "encoder"],
            help="hybrid: rules when confident, else the trained heads (default); keyword; encoder",
        ),
        Flag(
            "--keyword-min-confidence",
            type=float,
            help="rule confidence that settles the task in hybrid (default 0.6)",
        ),
        disable("--no-encoder", "encoder", "rules only: no torch, no embeddings"),
    ),
)


def main(argv: list[str] | None = None) -> None:
    SERVICE.main(argv)


if __name__ == "__main__":
    main()
