"""Hand-made router artifacts for end-to-end tests: one train prompt, each model's quality given."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from constellation import artifacts
from services.dispatch.routing import ARTIFACT_KIND, ProfileSettings


def write_router(
    root: Path,
    quality: Mapping[str, float],
    profiles: Mapping[str, ProfileSettings],
    *,
    output_tokens: float = 8.0,
    pool_kinds: list[str] | None = None,
) -> Path:
    """Saves a router whose one train prompt records ``quality`` per model; returns the artifact directory."""
    names = list(quality)
    recorded = np.array([[quality[m] for m in names]], dtype=np.float32)
    arrays = {
        "embeddings": (np.ones((1, 384), dtype=np.float32) / np.sqrt(384)).astype(np.float16),
        "quality": recorded,
        "output_tokens": np.full_like(recorded, output_tokens),
        "groups": np.zeros(1, dtype=np.int32),
    }
    manifest: dict[str, object] = {
        "models": names,
        "cards": {},
        "predictor": {"k": 1, "wide_k": 1, "alpha": 1.0, "power": 1.0},
        "profiles": {name: settings.to_json() for name, settings in profiles.items()},
    }
    if pool_kinds is not None:
        manifest["pool_kinds"] = pool_kinds
    return artifacts.save(ARTIFACT_KIND, arrays, manifest, root)
