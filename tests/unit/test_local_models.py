"""The local models (one generic Triton model configured per model), the default pool, and what the
untrained router plans over it on a fresh machine; the shipped classifier heads."""

from __future__ import annotations

import argparse
import ast
import io
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from apps.cli import AnswerPrinter, _pool_question
from apps.mesh import (
    DEMO_QUESTIONS,
    LOCAL_CAPABILITY,
    LOCAL_MODELS,
    RECORDED_CAPABILITY,
    MeshState,
    default_pool_file,
    demo_pool_file,
    recorded_pool_seed,
    state_file,
)
from constellation.errors import InvalidArgument
from constellation.pools import read_pool
from constellation.v1 import common_pb2, dispatch_pb2
from services.classifier.heads import load_artifact
from services.classifier.main import SHIPPED_ARTIFACT_ROOT
from services.dispatch.routing import UNTRAINED_PROFILES, PoolModel, Router
from services.inference import checkpoints
from services.inference.launcher import MODEL_REPOSITORY
from services.registry.seed import load_pool_file
from tests.pool_fixtures import write_pool

CAUSAL_LM = MODEL_REPOSITORY.parent / "causal_lm.py"


def _config(model: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse((MODEL_REPOSITORY / model / "config.pbtxt").read_text(), config)
    return config


def _loaders() -> dict[str, str]:
    """``LOADERS`` of the generic model, read from its source (it imports Triton's stub-only module)."""
    for node in ast.parse(CAUSAL_LM.read_text()).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "LOADERS":
            value = ast.literal_eval(node.value)  # type: ignore[arg-type]
            assert isinstance(value, dict)
            return value
    raise AssertionError("LOADERS not found")


def test_every_local_model_is_the_one_generic_model_configured_by_parameters() -> None:
    loaders = _loaders()
    for model in LOCAL_MODELS:
        script = MODEL_REPOSITORY / model / "1" / "model.py"
        assert script.is_symlink() and script.resolve() == CAUSAL_LM.resolve()
        config = _config(model)
        assert config.name == model and config.model_transaction_policy.decoupled
        loader = config.parameters["model_loader"].string_value
        module, _, function = loaders[loader].partition(":")
        assert module == checkpoints.__name__ and callable(getattr(checkpoints, function))
        assert loader in checkpoints.CHECKPOINTS
    assert _config("smollm2").parameters["apply_chat_template"].string_value == "true"
    gemma = _config("gemma3_270m")
    assert gemma.parameters["apply_chat_template"].string_value == "false"  # a base model continues text
    assert int(gemma.parameters["max_context_tokens"].string_value) > 0


def test_checkpoint_specs_name_their_packages_and_cache_dirs(tmp_path: Path) -> None:
    assert {spec.dir_name for spec in checkpoints.CHECKPOINTS.values()} == {"smollm2-135m-instruct", "gemma-3-270m"}
    assert not checkpoints.is_converted(checkpoints.GEMMA3_270M, tmp_path)
    assert checkpoints.model_dir(checkpoints.GEMMA3_270M, tmp_path) == tmp_path / "gemma-3-270m"
    (tmp_path / "gemma-3-270m").mkdir()
    (tmp_path / "gemma-3-270m" / "config.json").write_text("{}")
    assert checkpoints.ensure_checkpoint(checkpoints.GEMMA3_270M, tmp_path) == tmp_path / "gemma-3-270m"


def _default_pool() -> list[PoolModel]:
    return [
        PoolModel(r.name, r.price_in_per_mtok, r.price_out_per_mtok, r.family, r.params_b)
        for r in load_pool_file(default_pool_file())
    ]


def test_default_pool_describes_the_local_models_with_running_costs() -> None:
    records = {r.name: r for r in load_pool_file(default_pool_file())}
    assert set(records) == set(LOCAL_MODELS)
    for record in records.values():
        assert record.backend.model_name == record.name and record.backend.endpoint == ""
        assert 0 < record.price_in_per_mtok < record.price_out_per_mtok
        assert record.quality  # priors for the registry's per-slice estimates
    assert records["smollm2"].price_out_per_mtok < records["gemma3_270m"].price_out_per_mtok


def test_untrained_router_votes_for_quality_and_asks_one_cheap_model_when_balanced() -> None:
    router = Router(None, UNTRAINED_PROFILES)
    pool = _default_pool()
    vote = router.route(pool, answer_kind="number", profile="quality", input_tokens=20, expected_output_tokens=8)
    assert vote.policy == "vote" and {m.model for m in vote.members} == set(LOCAL_MODELS) and vote.quorum == 2
    single = router.route(pool, answer_kind="open", profile="balanced", input_tokens=20, expected_output_tokens=48)
    assert single.policy == "single" and [m.model for m in single.members] == ["smollm2"]
    assert all(c.reason for c in single.candidates)
    # the demo asks exactly these two kinds of question
    assert [q.profile for q in DEMO_QUESTIONS] == ["quality", "balanced"]


def test_shipped_classifier_heads_load_and_stay_small() -> None:
    artifact = load_artifact(SHIPPED_ARTIFACT_ROOT)
    assert artifact.path.parent.parent == SHIPPED_ARTIFACT_ROOT
    size = sum(f.stat().st_size for f in artifact.path.iterdir())
    assert size < 5 * 1024 * 1024, size
    assert artifact.manifest["labels"]["answer_kind"] == ["number", "choice", "code", "open"]


def _plan_event(chosen: list[str]) -> dispatch_pb2.AskResponse:
    candidates = [
        common_pb2.PlanCandidate(model=m, chosen=m in chosen, score=s, predicted_cost_usd=c, reason=f"reason {m}")
        for m, s, c in (("smollm2", 0.9, 1e-5), ("gemma3_270m", 0.8, 2e-5))
    ]
    plan = common_pb2.Plan(policy="vote" if len(chosen) > 1 else "single", candidates=candidates, summary="s")
    return dispatch_pb2.AskResponse(plan=dispatch_pb2.PlanEvent(plan=plan))


def test_demo_output_shows_reasons_members_confidence_and_the_alternative_cost() -> None:
    printer = AnswerPrinter(argparse.Namespace(verbose=True, quiet=False))
    finished = dispatch_pb2.CandidateEvent(
        model="smollm2",
        phase=dispatch_pb2.CandidateEvent.PHASE_FINISHED,
        text=" 42",
        usage=common_pb2.Usage(cost_usd=1.5e-5),
    )
    final = dispatch_pb2.FinalEvent(
        text="42", models=list(LOCAL_MODELS), confidence=0.5, uncertain=True, usage=common_pb2.Usage(cost_usd=3e-5)
    )
    err = io.StringIO()
    with redirect_stderr(err):
        printer.show(_plan_event(["smollm2", "gemma3_270m"]))
        printer.show(dispatch_pb2.AskResponse(candidate=finished))
        printer.show(dispatch_pb2.AskResponse(final=final))
    text = err.getvalue()
    assert "reason gemma3_270m" in text and "[member] smollm2" in text and "'42'" in text
    assert "UNCERTAIN" in text and "confidence: 0.50" in text
    assert "single-model alternative: smollm2 alone $0.0000150" in text  # measured, not predicted
    err = io.StringIO()
    with redirect_stderr(err):
        printer.show(_plan_event(["smollm2"]))
        single = dispatch_pb2.FinalEvent(models=["smollm2"], usage=common_pb2.Usage(cost_usd=2e-5))
        printer.show(dispatch_pb2.AskResponse(final=single))
    assert "all 2 models at once: ~$0.0000600 (3.0x" in err.getvalue()


def test_demo_pool_names_the_mesh_triton(tmp_path: Path) -> None:
    path = demo_pool_file(tmp_path, "127.0.0.1:18001")
    records = load_pool_file(path)
    assert {r.name for r in records} == set(LOCAL_MODELS)
    assert {r.backend.endpoint for r in records} == {"127.0.0.1:18001"}


def test_recorded_pool_seed_keeps_pool_questions_on_recorded_models(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "tiny.jsonl.gz")
    records = {r.name: r for r in load_pool_file(recorded_pool_seed(tmp_path, "127.0.0.1:18001", pool))}
    assert set(records) == {*LOCAL_MODELS, "cheap", "mid", "strong"}
    for name in LOCAL_MODELS:
        assert LOCAL_CAPABILITY in records[name].capabilities
    strong = records["strong"]
    assert strong.capabilities == [RECORDED_CAPABILITY] and strong.simulated
    assert strong.backend.model_name == "replay" and strong.backend.parameters["recorded_model"] == "strong"


def test_ask_sends_pool_questions_to_recorded_models_and_others_to_local_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = write_pool(tmp_path / "tiny.jsonl.gz")
    monkeypatch.setenv("CONSTELLATION_CACHE_DIR", str(tmp_path / "cache"))
    state = MeshState(1, "127.0.0.1:1", "", "", "", str(tmp_path), pool=str(pool))
    state.save(state_file())
    first_test = next(r for r in read_pool(pool, split="test"))

    def ask(prompt: str = "", pool_id: str | None = None) -> tuple[str, list[str]]:
        return _pool_question(argparse.Namespace(prompt=prompt, pool_id=pool_id, address=None))

    assert ask(pool_id="0") == (first_test.prompt, [RECORDED_CAPABILITY])
    assert ask(pool_id="tiny/0")[1] == [RECORDED_CAPABILITY]
    assert ask(first_test.prompt) == (first_test.prompt, [RECORDED_CAPABILITY])
    assert ask("Why is the sky blue?") == ("Why is the sky blue?", [LOCAL_CAPABILITY])
    with pytest.raises(InvalidArgument, match="no question"):
        ask(pool_id="tiny/99")
    state_file().unlink()
    with pytest.raises(InvalidArgument, match="up --pool"):
        ask(pool_id="0")
    assert ask("Why?") == ("Why?", [])
