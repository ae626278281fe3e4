"""Runs the classifier service: ``python -m services.classifier.main`` (or ``constellation serve classifier``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from constellation.config import load_config
from constellation.errors import ConstellationError
from constellation.ml.encoder import DEFAULT_HEAD_TOKENS, DEFAULT_MAX_TOKENS, BaseEncoder, Encoder
from constellation.server import Registration, RunningServer, create_server, serve
from constellation.v1 import classifier_pb2_grpc
from services.classifier.classify import Classifier, Policy
from services.classifier.config import ClassifierConfig
from services.classifier.heads import Artifact, default_artifact_root, load_artifact
from services.classifier.rules import DEFAULT_RULES, KeywordRules
from services.classifier.servicer import SERVICE_NAME, ClassifierServicer

log = logging.getLogger(__name__)


def _load_artifact(config: ClassifierConfig) -> Artifact | None:
    where = Path(config.artifact) if config.artifact else default_artifact_root()
    try:
        artifact = load_artifact(where)
    except ConstellationError as error:
        log.warning("classifier: %s; serving with the keyword path only (decided_by=keyword)", error.message)
        return None
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
    """Starts a classifier server for ``config`` (port 0 picks a free one) and stops it on exit.

    Args:
        config: Service settings.
        classifier: A ready classifier to serve (tests share one to load the encoder once); built from
            ``config`` when None. A classifier passed in is started but not closed here.
    """
    owned = classifier is None
    if classifier is None:
        classifier = await asyncio.to_thread(build_classifier, config)
    classifier.start()
    try:
        running = await create_server(registrations(classifier, config), config)
        try:
            yield running
        finally:
            await running.stop(config.shutdown_grace_s)
    finally:
        if owned:
            await classifier.close()


async def _main(config: ClassifierConfig) -> None:
    classifier = await asyncio.to_thread(build_classifier, config)
    async with classifier:
        await serve(
            registrations(classifier, config),
            config,
            on_started=lambda r: print(f"classifier listening on {config.host}:{r.port}", flush=True),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="constellation serve classifier",
        description="Run the classifier service (ClassifierService/Classify and ClassifyBatch): task type, "
        "complexity, expected output length, answer kind and the query embedding. Settings come from the "
        "[classifier] table of the config file and CONSTELLATION_CLASSIFIER_* variables; flags override both. "
        "Train the heads first with `constellation train classifier`; without them the keyword rules decide.",
    )
    parser.add_argument("--config", help="TOML config file (default: ./constellation.toml if present)")
    parser.add_argument("--port", type=int, help="gRPC port (default 50052; 0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 disables)")
    parser.add_argument("--artifact", help="trained heads: an artifact directory or one holding CURRENT")
    parser.add_argument(
        "--policy",
        choices=["hybrid", "keyword", "encoder"],
        help="hybrid: rules when confident, else the trained heads (default); keyword; encoder",
    )
    parser.add_argument(
        "--keyword-min-confidence", type=float, help="rule confidence that settles the task in hybrid (default 0.6)"
    )
    parser.add_argument("--no-encoder", action="store_true", help="rules only: no torch, no embeddings")
    args = parser.parse_args(argv)
    overrides = {
        "port": args.port,
        "metrics_port": args.metrics_port,
        "artifact": args.artifact,
        "policy": args.policy,
        "keyword_min_confidence": args.keyword_min_confidence,
        "encoder": False if args.no_encoder else None,
    }
    config = load_config(ClassifierConfig, args.config, **overrides)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_main(config))


if __name__ == "__main__":
    main()
