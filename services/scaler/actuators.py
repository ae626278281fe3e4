"""Actuators: what carries a scaling decision out. One protocol, two implementations.

* :class:`TritonActuator`: one Triton server in explicit model-control mode. A replica is a model instance:
  ``n >= 1`` replicas load the model with a config override whose ``instance_group`` counts sum to ``n``
  (Triton adds or removes instances of a loaded model in place); 0 unloads it.
* :class:`KedaActuator`: Kubernetes. Targets are published on a :class:`TargetBoard`, which the KEDA external
  scaler servicer (:mod:`services.scaler.servicer`) serves; KEDA and the HPA move the Triton model-group
  Deployment. No cluster is reachable from here, so the replicas it reports are the published targets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from constellation import tls
from constellation.errors import InternalError, NotFound, Unavailable

log = logging.getLogger(__name__)


class Actuator(Protocol):
    """Changes and reports a model's replicas. Calls for one model are never concurrent (the scaler holds a
    lock per model); calls for different models may be."""

    name: str

    async def replicas(self, model: str) -> int:
        """Replicas serving ``model`` now (0: unloaded or scaled to zero)."""
        ...

    async def scale(self, model: str, replicas: int) -> None:
        """Sets ``model`` to ``replicas``; returns once the change is done (a load: the model is ready).

        Raises:
            constellation.errors.ConstellationError: the change failed.
        """
        ...

    async def close(self) -> None:
        """Releases connections."""
        ...


def with_instance_count(config: dict[str, Any], replicas: int) -> dict[str, Any]:
    """A copy of a Triton model config (protobuf JSON form) whose instance groups hold ``replicas`` in all.

    The first group gets the count (its kind and devices kept); other groups are dropped. A config without
    groups gets one CPU group.
    """
    copied = json.loads(json.dumps(config))
    groups = copied.get("instance_group") or [{"kind": "KIND_CPU"}]
    first = dict(groups[0])
    first["count"] = replicas
    copied["instance_group"] = [first]
    return copied


def repository_config(repository: Path, model: str) -> dict[str, Any]:
    """``<repository>/<model>/config.pbtxt`` as protobuf JSON (the form Triton's load override takes).

    Raises:
        NotFound: the file is missing.
    """
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(repository) / model / "config.pbtxt"
    if not path.is_file():
        raise NotFound(f"no config for model {model!r} at {path}", metadata={"model": model})
    config = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    return dict(json_format.MessageToDict(config, preserving_proto_field_name=True))


class TritonActuator:
    """Scales models of one Triton server (``--model-control-mode=explicit``) by loading and unloading them.

    The base config of a model (what the override starts from) is the one Triton reports while the model is
    loaded, remembered for later; before that, the repository's ``config.pbtxt`` when ``model_repository``
    is given; else the model is loaded without an override first and its config read back.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        model_repository: The repository Triton serves, to read configs of unloaded models.
        load_timeout_s: Deadline of one load (a load that starts processes and reads weights), in seconds.
        control_timeout_s: Deadline of readiness, config and unload calls, in seconds.
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        *,
        model_repository: Path | None = None,
        load_timeout_s: float = 300.0,
        control_timeout_s: float = 10.0,
    ) -> None:
        from tritonclient.grpc import aio as triton_aio

        self.url = url
        self.model_repository = model_repository
        self.load_timeout_s = load_timeout_s
        self.control_timeout_s = control_timeout_s
        credentials = tls.triton_credentials()  # SSL to Triton when configured
        self._client = triton_aio.InferenceServerClient(url=url, ssl=credentials is not None, creds=credentials)
        self._configs: dict[str, dict[str, Any]] = {}
        self.loads = 0
        """Load calls made (each scale-up or instance change is one); tests check a burst makes one."""

    async def _call(self, coro: Any, model: str) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return await coro
        except InferenceServerException as exc:
            status = (exc.status() or "").upper()
            if "UNAVAILABLE" in status:
                raise Unavailable(f"Triton at {self.url} is not reachable", retry_after_s=1.0) from exc
            raise InternalError(f"Triton model control of {model!r} failed: {exc.message()}") from exc

    async def replicas(self, model: str) -> int:
        ready = await self._call(self._client.is_model_ready(model, client_timeout=self.control_timeout_s), model)
        if not ready:
            return 0
        config = await self._loaded_config(model)
        groups = config.get("instance_group") or [{}]
        return sum(int(group.get("count", 1)) for group in groups)

    async def _loaded_config(self, model: str) -> dict[str, Any]:
        answer = await self._call(
            self._client.get_model_config(model, as_json=True, client_timeout=self.control_timeout_s), model
        )
        config = dict(answer.get("config", {}))
        self._configs.setdefault(model, config)
        return config

    def _base_config(self, model: str) -> dict[str, Any] | None:
        if model in self._configs:
            return self._configs[model]
        if self.model_repository is not None:
            self._configs[model] = repository_config(self.model_repository, model)
            return self._configs[model]
        return None

    async def scale(self, model: str, replicas: int) -> None:
        if replicas <= 0:
            log.info("scaler: unloading %s from Triton at %s", model, self.url)
            await self._call(self._client.unload_model(model, client_timeout=self.control_timeout_s), model)
            return
        base = self._base_config(model)
        if base is None:
            await self._load(model, None)
            base = await self._loaded_config(model)
            if sum(int(g.get("count", 1)) for g in base.get("instance_group") or [{}]) == replicas:
                return
        await self._load(model, with_instance_count(base, replicas))

    async def _load(self, model: str, config: dict[str, Any] | None) -> None:
        count = "repository" if config is None else config["instance_group"][0]["count"]
        log.info("scaler: loading %s on Triton at %s with %s instance(s)", model, self.url, count)
        self.loads += 1
        override = json.dumps(config) if config is not None else None
        await self._call(self._client.load_model(model, config=override, client_timeout=self.load_timeout_s), model)

    async def close(self) -> None:
        await self._client.close()


class TargetBoard:
    """The latest target replicas per model, for KEDA's external scaler. Use from one event loop.

    Readers that stream (``StreamIsActive``) wait on :meth:`changed`, which wakes them on every publish.
    """

    def __init__(self) -> None:
        self.targets: dict[str, int] = {}
        self._version = 0
        self._condition = asyncio.Condition()

    def get(self, model: str) -> int | None:
        """The published target of ``model``; None when none was published."""
        return self.targets.get(model)

    async def publish(self, model: str, replicas: int) -> None:
        self.targets[model] = replicas
        async with self._condition:
            self._version += 1
            self._condition.notify_all()

    @property
    def version(self) -> int:
        """Increases on every publish."""
        return self._version

    async def changed(self, since: int) -> int:
        """Waits until a publish after version ``since``; returns the new version."""
        async with self._condition:
            await self._condition.wait_for(lambda: self._version > since)
            return self._version


class KedaActuator:
    """Publishes targets on a :class:`TargetBoard` for KEDA to read; the cluster does the scaling.

    ``replicas`` reports the published target, since the pods that KEDA and the HPA start are not observable
    from here. A model asked about for the first time is published at ``initial``, so that KEDA sees a model
    the scaler holds steady as active from the first round (a hold publishes nothing).

    Args:
        board: Where targets go (shared with the external scaler servicer).
        initial: Replicas published for a model the scaler starts managing.
    """

    name = "keda"

    def __init__(self, board: TargetBoard, initial: int = 1) -> None:
        self.board = board
        self.initial = initial

    async def replicas(self, model: str) -> int:
        target = self.board.get(model)
        if target is None:
            await self.board.publish(model, self.initial)
            return self.initial
        return target

    async def scale(self, model: str, replicas: int) -> None:
        await self.board.publish(model, replicas)

    async def close(self) -> None:
        return None
