from __future__ import annotations

from pathlib import Path

import pytest

from constellation.config import load_config
from constellation.errors import InvalidArgument
from services.dispatch.config import DispatchConfig


def test_file_then_environment_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[dispatch]\ntriton_url = "10.0.0.5:8001"\ndefault_max_tokens = 32\n'
        "[dispatch.models.smollm2]\nprice_in_per_mtok = 0.1\nprice_out_per_mtok = 0.2\n"
    )
    monkeypatch.setenv("CONSTELLATION_DISPATCH_DEFAULT_MAX_TOKENS", "48")
    config = load_config(DispatchConfig, path, port=0)
    assert config.triton_url == "10.0.0.5:8001"
    assert config.default_max_tokens == 48
    assert config.port == 0
    assert config.models["smollm2"].price_out_per_mtok == pytest.approx(0.2)


def test_bad_value_names_field_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSTELLATION_DISPATCH_MAX_PROMPT_CHARS", "-3")
    with pytest.raises(InvalidArgument) as caught:
        load_config(DispatchConfig, tmp_path / "missing.toml")
    assert "CONSTELLATION_DISPATCH_MAX_PROMPT_CHARS" in caught.value.message


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[dispatch]\ntriton_adress = 'x'\n")
    with pytest.raises(InvalidArgument, match="triton_adress"):
        load_config(DispatchConfig, path)
