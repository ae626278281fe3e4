"""Runs the ranking service: ``python -m services.ranking.main`` (or ``constellation serve ranking``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing

from constellation.errors import ConstellationError
from constellation.server import Registration, RunningServer, serving
from constellation.service import Flag, ServiceMain, disable, optional_artifact
from constellation.v1 import ranking_pb2_grpc
from services.ranking.config import RankingConfig
from services.ranking.pairwise import RankerArtifact, default_artifact_root, load_ranker
from services.ranking.rank import Ranker
from services.ranking.servicer import SERVICE_NAME, RankingServicer

log = logging.getLogger(__name__)


def _load_artifact(config: RankingConfig) -> RankerArtifact | None:
    without = "ranking by the first stage alone (centrality, agreement, form)"
    artifact = optional_artifact("ranking", load_ranker, config.artifact, default_artifact_root, without)
    if artifact is not None:
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
    """The ranking service's lifespan: the ranker, its servicer (which owns a worker pool) and the server.

    Args:
        config: Service settings; port 0 picks a free one.
        ranker: A ready ranker to serve (tests share one so the encoder loads once); built from
            ``config`` off the event loop when None.
    """
    if ranker is None:
        ranker = await asyncio.to_thread(build_ranker, config)
    with closing(RankingServicer(ranker, config)) as servicer:
        async with serving(registrations(servicer), config) as running:
            yield running


SERVICE = ServiceMain(
    name="ranking",
    config=RankingConfig,
    description="Run the ranking service (RankingService/Rank): a cheap first stage (embedding centrality, "
    "agreement of closed answers, form checks) prunes a large candidate set, then a trained pairwise ranker "
    "orders the survivors best first. Settings come from the [ranking] table of the config file and "
    "CONSTELLATION_RANKING_* variables; flags override both. Train the ranker first with "
    "`constellation train ranker`; without it the first stage alone orders the candidates.",
    lifespan=running_ranking,
    flags=(
        Flag("--artifact", help="trained pair ranker: an artifact directory or one holding CURRENT"),
        Flag("--keep-fraction", type=float, help="share of a large set the first stage keeps (0.35)"),
        disable("--no-encoder", "encoder", "no torch: agreement and form checks only"),
    ),
)


def main(argv: list[str] | None = None) -> None:
    SERVICE.main(argv)


if __name__ == "__main__":
    main()
