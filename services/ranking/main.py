"""Runs the ranking service: ``python -m services.ranking.main`` (or ``constellation serve ranking``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from constellation.config import load_config
from constellation.errors import ConstellationError
from constellation.server import Registration, RunningServer, create_server, serve
from constellation.v1 import ranking_pb2_grpc
from services.ranking.config import RankingConfig
from services.ranking.pairwise import RankerArtifact, default_artifact_root, load_ranker
from services.ranking.rank import Ranker
from services.ranking.servicer import SERVICE_NAME, RankingServicer

log = logging.getLogger(__name__)


def _load_artifact(config: RankingConfig) -> RankerArtifact | None:
    where = Path(config.artifact) if config.artifact else default_artifact_root()
    try:
        artifact = load_ranker(where)
    except ConstellationError as error:
        log.warning("ranking: %s; ranking by the first stage alone (centrality, agreement, form)", error.message)
        return None
    log.info("ranking: loaded pair ranker %s from %s", artifact.content_hash[:12], artifact.path)
    return artifact


def build_ranker(config: RankingConfig, *, encoder: object | None = None) -> Ranker:
    """Loads the encoder and the trained pair ranker for ``config``. Blocking (about a second, most of it
    importing torch): call it off the event loop.

    Neither a missing artifact nor a missing encoder package is an error: the service then ranks by the
    first stage alone (without the encoder: agreement and form only), and a warning says so.

    Args:
        config: Service settings.
        encoder: An encoder already loaded (tests share one); used when ``config.encoder`` is true.
    """
    if not config.encoder:
        log.warning("ranking: the encoder is disabled (encoder=false): first stage only, without centrality")
        ranker = Ranker(None, None, keep_fraction=config.keep_fraction, prune_from=config.prune_from)
        log.info("ranking: %s", ranker.description)
        return ranker
    artifact = _load_artifact(config)
    if encoder is None:
        from constellation.ml.encoder import Encoder

        try:
            encoder = Encoder(threads=config.encoder_threads or None)
        except ConstellationError as error:
            log.warning("ranking: %s; first stage only, without centrality", error.message)
            artifact = None
    if encoder is not None and artifact is not None:
        trained = artifact.manifest.get("encoder", {}).get("weights_sha256")
        identity = getattr(encoder, "identity", None)
        if identity is not None and trained != identity.weights_sha256:
            log.warning(
                "ranking: pair ranker %s was trained on encoder weights %s, these are %s; retrain it",
                artifact.content_hash[:12],
                trained,
                identity.weights_sha256,
            )
    ranker = Ranker(encoder, artifact, keep_fraction=config.keep_fraction, prune_from=config.prune_from)
    log.info("ranking: %s", ranker.description)
    return ranker


def registrations(servicer: RankingServicer) -> list[Registration]:
    return [Registration(servicer, ranking_pb2_grpc.add_RankingServiceServicer_to_server, SERVICE_NAME)]  # type: ignore[arg-type]


@asynccontextmanager
async def running_ranking(config: RankingConfig, *, ranker: Ranker | None = None) -> AsyncIterator[RunningServer]:
    """Starts a ranking server for ``config`` (port 0 picks a free one) and stops it on exit.

    Args:
        config: Service settings.
        ranker: A ready ranker to serve (tests share one so the encoder loads once); built from
            ``config`` off the event loop when None.
    """
    if ranker is None:
        ranker = await asyncio.to_thread(build_ranker, config)
    servicer = RankingServicer(ranker, config)
    try:
        running = await create_server(registrations(servicer), config)
        try:
            yield running
        finally:
            await running.stop(config.shutdown_grace_s)
    finally:
        servicer.close()


async def _main(config: RankingConfig) -> None:
    ranker = await asyncio.to_thread(build_ranker, config)
    servicer = RankingServicer(ranker, config)
    try:
        await serve(
            registrations(servicer),
            config,
            on_started=lambda r: print(f"ranking listening on {config.host}:{r.port}", flush=True),
        )
    finally:
        servicer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="constellation serve ranking",
        description="Run the ranking service (RankingService/Rank): a cheap first stage (embedding centrality, "
        "agreement of closed answers, form checks) prunes a large candidate set, then a trained pairwise ranker "
        "orders the survivors best first. Settings come from the [ranking] table of the config file and "
        "CONSTELLATION_RANKING_* variables; flags override both. Train the ranker first with "
        "`constellation train ranker`; without it the first stage alone orders the candidates.",
    )
    parser.add_argument("--config", help="TOML config file (default: ./constellation.toml if present)")
    parser.add_argument("--port", type=int, help="gRPC port (default 50054; 0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 disables)")
    parser.add_argument("--artifact", help="trained pair ranker: an artifact directory or one holding CURRENT")
    parser.add_argument("--keep-fraction", type=float, help="share of a large set the first stage keeps (0.35)")
    parser.add_argument("--no-encoder", action="store_true", help="no torch: agreement and form checks only")
    args = parser.parse_args(argv)
    overrides = {
        "port": args.port,
        "metrics_port": args.metrics_port,
        "artifact": args.artifact,
        "keep_fraction": args.keep_fraction,
        "encoder": False if args.no_encoder else None,
    }
    config = load_config(RankingConfig, args.config, **overrides)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_main(config))


if __name__ == "__main__":
    main()
