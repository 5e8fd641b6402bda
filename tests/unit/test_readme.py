"""The README's configuration reference is generated from the code and must not drift."""

from pathlib import Path

from aigc_ray.config import config_reference


def test_readme_config_reference_matches_the_models():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [row for row in config_reference() if row not in readme]
    assert not missing, "regenerate the README table: " + "\n".join(missing[:5])
