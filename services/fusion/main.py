"""Runs the fusion service: ``python -m services.fusion.main`` (or ``constellation serve fusion``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from constellation.server import Registration, RunningServer, serving
from constellation.service import Flag, ServiceMain, optional_artifact
from constellation.triton import TritonClient
from constellation.v1 import fusion_pb2_grpc
from services.fusion.calibration import Calibrator, default_artifact_root, load_artifact
from services.fusion.config import FusionConfig
from services.fusion.fuse import Fuser, FuserSettings
from services.fusion.servicer import SERVICE_NAME, FusionServicer

log = logging.getLogger(__name__)


def load_calibrator(config: FusionConfig) -> Calibrator | None:
    """The calibrator ``config`` names (or the current one); None, with a warning, when there is none."""
    without = (
        "vote confidence is the weighted share of the winner (uncalibrated), "
        f"uncertain below {config.uncalibrated_threshold:.2f}"
    )
    artifact = optional_artifact("fusion", load_artifact, config.artifact, default_artifact_root, without)
    if artifact is None:
        return None
    log.info(
        "fusion: calibrator %s from %s (%s, %s weighting, uncertain below %.3f)",
        artifact.content_hash[:12],
        artifact.path,
        artifact.manifest.get("method"),
        artifact.calibrator.weighting,
        artifact.calibrator.threshold,
    )
    return artifact.calibrator


def settings_of(config: FusionConfig) -> FuserSettings:
    return FuserSettings(
        fuser_model=config.fuser_model,
        fuse_timeout_s=config.fuse_timeout_s,
        deadline_reserve_s=config.deadline_reserve_s,
        prompt_budget_chars=config.prompt_budget_chars,
        max_fused_candidates=config.max_fused_candidates,
        uncalibrated_threshold=config.uncalibrated_threshold,
        price_in_per_mtok=config.fuser_price_in_per_mtok,
        price_out_per_mtok=config.fuser_price_out_per_mtok,
    )


@asynccontextmanager
async def running_fusion(config: FusionConfig, *, calibrator: Calibrator | None = None) -> AsyncIterator[RunningServer]:
    """The fusion service's lifespan: a Triton client, the fuser and the server; closed in reverse on exit.

    Triton is not contacted at start: the fuser is called per open-answer request, and a Triton that
    cannot be reached then makes that request fall back to its top candidate.

    Args:
        config: Service settings; port 0 picks a free one.
        calibrator: A calibrator to use instead of loading ``config.artifact`` (tests).
    """
    if calibrator is None:
        calibrator = await asyncio.to_thread(load_calibrator, config)
    async with TritonClient(config.triton_url) as triton:
        servicer = FusionServicer(Fuser(triton, calibrator, settings_of(config)), config)
        registration = Registration(
            servicer,
            fusion_pb2_grpc.add_FusionServiceServicer_to_server,  # type: ignore[arg-type]
            SERVICE_NAME,
        )
        async with serving([registration], config) as running:
            yield running


SERVICE = ServiceMain(
    name="fusion",
    config=FusionConfig,
    description="Run the fusion service (FusionService/Fuse): a reliability-weighted vote with calibrated "
    "confidence for closed answers, the top candidate for code, and generative fusion by a Triton model for "
    "open answers. Settings come from the [fusion] table of the config file and CONSTELLATION_FUSION_* "
    "variables; flags override both. Train the calibrator first with `constellation train fusion`; without "
    "it, confidence is the uncalibrated weighted share.",
    lifespan=running_fusion,
    flags=(
        Flag("--triton-url", help="Triton gRPC host:port serving the fuser model (default 127.0.0.1:8001)"),
        Flag("--fuser-model", help="default fuser model (default smollm2)"),
        Flag("--artifact", help="calibrator: an artifact directory or one holding CURRENT"),
    ),
)


def main(argv: list[str] | None = None) -> None:
    SERVICE.main(argv)


if __name__ == "__main__":
    main()
