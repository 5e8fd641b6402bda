"""The Grafana dashboards as files (no Ray): well-formed, templated on ${datasource}, naming
only metrics the code defines; their installation into a Grafana setup; the training gauges'
values. tests/integration/test_monitoring.py runs every panel's query against a real
Prometheus scraping a real Ray."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from aigc_ray import cli
from aigc_ray.dashboards import DASHBOARD_FILES, DashboardError, install_dashboards
from aigc_ray.train import metrics as train_metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def _panels(dashboard: dict) -> list[dict]:
    return [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]


def _defined_metrics() -> set[str]:
    """Every series name our code registers, as Ray exports it (`ray_` prefix, Prometheus
    suffixes for counters and histograms)."""
    names = set()
    for src in ("aigc_ray/serve/metrics.py", "aigc_ray/train/metrics.py"):
        names |= set(re.findall(r'"(aigc_ray_\w+)"', (ROOT / src).read_text()))
    names |= {train_metrics.PREFIX + g for g in train_metrics.GAUGES}
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    return {f"ray_{n}{s}" for n in names for s in suffixes}


def test_the_dashboards_are_serving_and_training():
    assert [p.name for p in DASHBOARD_FILES] == ["aigc_ray_serving.json", "aigc_ray_training.json"]
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_panel_queries_prometheus_through_the_datasource_variable(path):
    d = json.loads(path.read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [p for p in _panels(d) if p["type"] != "row"]
    assert graphs
    ids = [p["id"] for p in _panels(d)]
    assert len(set(ids)) == len(ids)
    for p in graphs:
        assert p["datasource"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == "${datasource}" and t["expr"].strip(), p["title"]
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used <= set(variables) | GRAFANA_BUILTINS, (p["title"], used)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_our_panels_name_only_metrics_the_code_defines(path):
    """A renamed metric breaks its panel here, in a second (Ray's own ray_serve_* series are
    checked against a live scrape in the integration test)."""
    d = json.loads(path.read_text())
    exprs = [t["expr"] for p in _panels(d) for t in p.get("targets", [])]
    ours = {m for e in exprs for m in re.findall(r"\b(ray_aigc_ray_\w+)", e)}
    assert ours and ours <= _defined_metrics(), ours - _defined_metrics()
    assert all("histogram_quantile" not in e or "_bucket" in e for e in exprs)


def test_install_adds_a_provider_beside_rays_own(tmp_path):
    grafana = tmp_path / "session_x" / "metrics" / "grafana"
    (grafana / "provisioning" / "dashboards").mkdir(parents=True)
    (grafana / "provisioning" / "dashboards" / "default.yml").write_text("providers: []\n")
    latest = tmp_path / "session_latest"
    latest.symlink_to(tmp_path / "session_x")
    written = install_dashboards(latest / "metrics" / "grafana")
    copies = grafana / "aigc_ray_dashboards"
    assert sorted(p.name for p in copies.iterdir()) == [p.name for p in DASHBOARD_FILES]
    provider = yaml.safe_load((grafana / "provisioning/dashboards/aigc_ray.yml").read_text())
    # the resolved session directory, as Ray's own provider names it
    assert provider["providers"][0]["options"]["path"] == str(copies.resolve())
    assert provider["providers"][0]["type"] == "file"
    assert len(written) == 3
    assert (grafana / "provisioning/dashboards/default.yml").read_text() == "providers: []\n"


def test_install_without_a_grafana_setup_names_the_directory(tmp_path):
    with pytest.raises(DashboardError, match=str(tmp_path / "nope")):
        install_dashboards(tmp_path / "nope")


def test_cli_dashboards_command(tmp_path, capsys):
    (tmp_path / "provisioning").mkdir()
    (tmp_path / "grafana.ini").write_text("")
    assert cli.main(["dashboards", "--grafana-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "aigc_ray_serving.json" in out and f"--config {tmp_path}/grafana.ini" in out
    assert cli.main(["dashboards", "--grafana-dir", str(tmp_path / "missing")]) == 2
    assert "no Grafana provisioning folder" in capsys.readouterr().err


# ---------------------------------------------------------------- training gauges


def test_row_values_of_a_text_and_an_image_row():
    text = {"step": 20, "loss": 3.5, "val_loss": 3.9, "tokens_per_s": 1200.0, "lr": 0.001}
    assert sorted(train_metrics.row_values(text, 0.25)) == sorted(
        [
            ("step", 20.0, {}),
            ("loss", 3.5, {}),
            ("eval_loss", 3.9, {}),
            ("step_seconds", 0.25, {}),
            ("throughput", 1200.0, {"unit": "tokens"}),
        ]
    )
    image = {"step": 10, "loss": 0.2, "images_per_s": 64.0}
    assert ("throughput", 64.0, {"unit": "images"}) in train_metrics.row_values(image, 0.1)
    # a missing or non-finite value is left out: the gauge keeps its last value
    names = [n for n, _, _ in train_metrics.row_values({"step": 3, "val_loss": None}, math.nan)]
    assert names == ["step"]


class _FakeRecorder:
    def __init__(self):
        self.values = {}

    def set(self, name, value, extra=None):
        self.values[(name, tuple(sorted((extra or {}).items())))] = value


def test_checkpoint_age_starts_at_the_restored_checkpoint(monkeypatch):
    rec = _FakeRecorder()
    monkeypatch.setitem(train_metrics._recorders, "r", rec)
    history = [{"step": 0, "val_loss": 6.0}, {"step": 20, "loss": 4.0, "time": 1000.0}]
    train_metrics.start("r", history)
    assert rec.values[("last_checkpoint_timestamp_seconds", ())] == 1000.0
    assert rec.values[("step", ())] == 20.0
    train_metrics.checkpointed("r")
    assert rec.values[("last_checkpoint_timestamp_seconds", ())] > 1000.0
    train_metrics.record("r", {"step": 30, "loss": 3.0, "tokens_per_s": 10.0}, 0.5)
    assert rec.values[("throughput", (("unit", "tokens"),))] == 10.0
    monkeypatch.setitem(train_metrics._recorders, "other-rank", None)  # ranks > 0: no-ops
    train_metrics.record("other-rank", {"step": 1}, 0.1)
