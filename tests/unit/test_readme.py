"""The configuration reference is generated from the code and must not drift."""

from pathlib import Path

from aigc_ray.config import reference_markdown


def test_configuration_reference_matches_the_models():
    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), (
        "regenerate it: python -m aigc_ray.config > docs/configuration.md"
    )
