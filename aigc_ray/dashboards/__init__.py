"""Grafana dashboards for the metrics aigc_ray exports through Ray (serving and training), and
their installation into a Ray session's Grafana setup.

The JSON files here are the dashboards (edit them in Grafana and export, or by hand); every
panel queries Prometheus through the ``${datasource}`` variable, as Ray's own dashboards do.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from aigc_ray.errors import AigcRayError

__all__ = ["DASHBOARD_FILES", "DashboardError", "default_grafana_dir", "install_dashboards"]

HERE = Path(__file__).parent
DASHBOARD_FILES = sorted(HERE.glob("*.json"))
PROVISIONING_FILE = HERE / "provisioning.yml"
DASHBOARDS_SUBDIR = "aigc_ray_dashboards"


class DashboardError(AigcRayError, RuntimeError):
    """The Grafana directory to install into is missing or not a Grafana setup."""


def default_grafana_dir() -> Path:
    """The Grafana setup Ray's dashboard writes for the latest session on this node:
    <ray temp dir>/session_latest/metrics/grafana (the temp dir as Ray picks it)."""
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp"
    return Path(base, "ray", "session_latest", "metrics", "grafana")


def install_dashboards(grafana_dir: str | Path | None = None) -> list[Path]:
    """Copy the dashboards to ``grafana_dir``/aigc_ray_dashboards and add a dashboard provider
    for them to ``grafana_dir``/provisioning/dashboards/aigc_ray.yml; return the files written.

    ``grafana_dir`` defaults to the latest Ray session's Grafana setup (resolved: Ray's own
    provider names the session directory, and a new session starts a fresh setup, so run this
    again after each `ray start`). A stock Grafana's config directory (/etc/grafana) works too.
    """
    given = Path(grafana_dir) if grafana_dir else default_grafana_dir()
    if not (given / "provisioning").is_dir():
        raise DashboardError(
            f"no Grafana provisioning folder in {given}: Ray writes "
            "<session>/metrics/grafana when its dashboard starts (`ray start --head`, with "
            "ray[default] installed); for another Grafana pass --grafana-dir <its config dir>"
        )
    root = given.resolve()
    target = root / DASHBOARDS_SUBDIR
    target.mkdir(exist_ok=True)
    written = []
    for src in DASHBOARD_FILES:
        json.loads(src.read_text())  # a broken file must not reach Grafana
        written.append(Path(shutil.copyfile(src, target / src.name)))
    provider = yaml.safe_load(PROVISIONING_FILE.read_text())
    provider["providers"][0]["options"]["path"] = str(target)
    out = root / "provisioning" / "dashboards" / "aigc_ray.yml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        "# written by `aigc-ray dashboards`\n" + yaml.safe_dump(provider, sort_keys=False)
    )
    return [*written, out]
