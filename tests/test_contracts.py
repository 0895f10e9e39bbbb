"""The contracts: committed stubs match proto/, settings come from flags > DIGITS_* > defaults, and
the model metadata round-trips and is refused with a clear message when incomplete."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from service.recognition.model_metadata import MetadataError, ModelMetadata, Normalization
from service.server.config import ServerConfig, add_arguments, env_name, from_sources

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    generated = generate.generate(tmp_path / "gen")
    committed = ROOT / "service" / "gen"
    assert generated, "protoc produced nothing"
    for path in generated:
        relative = path.relative_to(tmp_path / "gen")
        assert (committed / relative).read_text() == path.read_text(), (
            f"service/gen/{relative} is stale: run `make proto` and commit the result")
    stale = {p.relative_to(committed) for p in committed.rglob("*.py*") if "__pycache__" not in p.parts} - {
        p.relative_to(tmp_path / "gen") for p in generated}
    assert not stale, f"service/gen has files no .proto produces: {sorted(map(str, stale))}"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flag_beats_environment_beats_default() -> None:
    env = {"DIGITS_MAX_BATCH_SIZE": "32", "DIGITS_PORT": "6000", "DIGITS_WATCH": "true", "DIGITS_DEVICE": "cpu"}
    cfg = from_sources(_parse("--port", "7000"), env)
    assert cfg.port == 7000  # flag
    assert cfg.max_batch_size == 32  # environment
    assert cfg.watch is True and cfg.device == "cpu"
    assert cfg.max_queue == ServerConfig().max_queue  # default


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    for name in ServerConfig().summary():
        assert "--" + name.replace("_", "-") in help_text
        assert env_name(name) in help_text


@pytest.mark.parametrize(("env", "message"), [
    ({"DIGITS_MAX_BATCH_SIZE": "lots"}, "DIGITS_MAX_BATCH_SIZE='lots'"),
    ({"DIGITS_DEVICE": "tpu"}, "must be one of auto, cpu, cuda"),
    ({"DIGITS_MAX_BATCH_SIZE": "0"}, "max-batch-size must be >= 1"),
    ({"DIGITS_TLS_CERT": "/x.pem"}, "tls-cert and tls-key must be given together"),
])
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        from_sources(None, env)
    assert message in str(caught.value)


def test_metadata_round_trip_and_refusals() -> None:
    meta = ModelMetadata(name="lenet5", version="9", normalization=Normalization(1 / 255, 0.1307, 0.3081),
                         labels=tuple("0123456789"), extra={"val_accuracy": "0.99"})
    props = meta.to_props()
    assert ModelMetadata.from_props(props) == meta
    for key, bad, message in [
        ("normalization", json.dumps({"scale": 1, "mean": 0}), "must be JSON with scale, mean, std"),
        ("normalization", json.dumps({"scale": 1, "mean": 0, "std": 0}), "std > 0"),
        ("input_shape", "[3, 28, 28]", "1 (grayscale) channel"),
        ("labels", "[]", "'labels' is empty"),
        ("ink_polarity", "purple", "ink_polarity"),
    ]:
        with pytest.raises(MetadataError) as caught:
            ModelMetadata.from_props({**props, key: bad})
        assert message in str(caught.value)
    incomplete = {k: v for k, v in props.items() if k != "labels"}
    with pytest.raises(MetadataError, match="missing labels"):
        ModelMetadata.from_props(incomplete)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [env_name(name) for name in ServerConfig().summary() if f"`{env_name(name)}`" not in readme]
    assert not missing, f"README's settings table lacks {missing}"
