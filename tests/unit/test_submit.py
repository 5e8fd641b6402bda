"""aigc-ray submit: the upload preflight walks the working dir with Ray's own rules and refuses a
package over the limit before `ray job submit` zips and uploads it."""

import os
import sys
from pathlib import Path

import pytest

from aigc_ray import cli
from aigc_ray.submit import UploadError, check_upload, plan_upload, ray_upload_limit, submit

REPO = ROOT_PKG = Path(__file__).resolve().parents[2]
MIB = 2**20


def test_repo_upload_is_small_and_leaves_out_outputs_and_history():
    plan = plan_upload(REPO)
    names = {rel for rel, _ in plan.files}
    # every package of the project travels (an unanchored "data/" once dropped aigc_ray/data)
    for init in (ROOT_PKG / "aigc_ray").rglob("__init__.py"):
        assert init.relative_to(ROOT_PKG).as_posix() in names
    assert {
        "aigc_ray/data/stage.py",
        "jobs/pipeline.py",
        "configs/tiny.yaml",
        "constraints.txt",
    } <= names
    for top in (".git/", ".venv/", "runs/", "data/", ".pytest_cache/"):
        assert not any(n.startswith(top) for n in names), top
    assert not any("__pycache__/" in n for n in names)
    assert plan.total < 5 * MIB, plan.largest()
    check_upload(REPO)  # the project itself passes


def test_limit_is_rays_own():
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    assert ray_upload_limit() == GCS_STORAGE_MAX_SIZE == 512 * MIB


def _workdir(tmp_path: Path) -> Path:
    wd = tmp_path / "proj"
    (wd / "jobs").mkdir(parents=True)
    (wd / "jobs" / "x.py").write_text("print('hi')\n")
    return wd


def test_over_the_limit_is_refused_with_the_offenders_named(tmp_path):
    wd = _workdir(tmp_path)
    (wd / "checkpoints").mkdir()
    (wd / "checkpoints" / "model.bin").write_bytes(os.urandom(3 * MIB))  # incompressible
    with pytest.raises(UploadError) as err:
        check_upload(wd, limit=2 * MIB)
    msg = str(err.value)
    assert "over Ray's 2.0 MiB limit" in msg and "checkpoints/ (3.0 MiB)" in msg
    assert ".rayignore" in msg and "excludes" in msg


def test_package_size_matches_the_zip_ray_builds(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    wd = _workdir(tmp_path)
    (wd / "zeros.txt").write_bytes(b"0" * MIB)  # Ray stores, never deflates: no help from zeros
    for i in range(200):
        (wd / "jobs" / f"module_{i}.py").write_text("x = 1\n" * i)
    (wd / ".rayignore").write_text("skipped/\n")
    (wd / "skipped").mkdir()
    (wd / "skipped" / "blob").write_bytes(b"1" * MIB)
    target = tmp_path / "pkg.zip"
    create_package(str(wd), target, include_gitignore=True)
    actual, ours = target.stat().st_size, plan_upload(wd).package_size()
    assert actual <= ours <= actual + 50 * 1024, (actual, ours)


@pytest.mark.parametrize("how", ["rayignore", "gitignore", "excludes"])
def test_excluded_files_do_not_count(tmp_path, how):
    wd = _workdir(tmp_path)
    (wd / "big").mkdir()
    (wd / "big" / "blob.bin").write_bytes(os.urandom(3 * MIB))
    excludes = []
    if how == "excludes":
        excludes = ["big/"]
    else:
        (wd / f".{how}").write_text("big/\n")
    plan = check_upload(wd, excludes, limit=2 * MIB)
    assert [rel for rel, _ in plan.files if rel.startswith("big")] == []


def test_cli_refuses_before_calling_ray(tmp_path, monkeypatch, capsys):
    wd = _workdir(tmp_path)
    (wd / "blob.bin").write_bytes(os.urandom(3 * MIB))
    monkeypatch.setattr("aigc_ray.submit.ray_upload_limit", lambda: 2 * MIB)
    monkeypatch.setattr(os, "execvp", lambda *a: pytest.fail(f"ray was called: {a}"))
    rc = cli.main(["submit", "--working-dir", str(wd), "--", "python", "jobs/x.py"])
    assert rc == 2
    assert "aigc-ray: error: the working dir" in capsys.readouterr().err


def test_cli_execs_the_real_ray_job_submit(tmp_path, monkeypatch):
    wd = _workdir(tmp_path)
    (wd / "big").mkdir()
    (wd / "big" / "blob.bin").write_bytes(os.urandom(3 * MIB))  # over the limit unless excluded
    monkeypatch.setattr("aigc_ray.submit.ray_upload_limit", lambda: 2 * MIB)
    calls = []
    monkeypatch.setattr(os, "execvp", lambda exe, argv: calls.append(argv))
    env_json = '{"excludes": ["big/"], "env_vars": {"A": "1"}}'
    rc = cli.main(
        [
            "submit",
            "--address",
            "http://127.0.0.1:8265",
            f"--working-dir={wd}",
            "--runtime-env-json",
            env_json,
            "--no-wait",
            "--",
            "python",
            "jobs/x.py",
            "--config",
            "c.yaml",
        ]
    )
    assert rc == 0
    [argv] = calls
    assert argv[0] == str(Path(sys.executable).parent / "ray")
    assert argv[1:] == [
        "job",
        "submit",
        "--working-dir",
        str(wd),
        "--address",
        "http://127.0.0.1:8265",
        "--runtime-env-json",
        env_json,
        "--no-wait",
        "--",
        "python",
        "jobs/x.py",
        "--config",
        "c.yaml",
    ]


def test_a_runtime_env_file_names_the_dir_and_its_excludes(tmp_path, monkeypatch):
    """`--runtime-env env.yaml` with working_dir + excludes: checked as Ray will pack it, and
    no --working-dir is added to override the file's."""
    wd = _workdir(tmp_path)
    (wd / "big").mkdir()
    (wd / "big" / "blob.bin").write_bytes(os.urandom(3 * MIB))
    env_file = tmp_path / "env.yaml"
    env_file.write_text(f"working_dir: {wd}\nexcludes: [big/]\n")
    monkeypatch.setattr("aigc_ray.submit.ray_upload_limit", lambda: 2 * MIB)
    calls = []
    monkeypatch.setattr(os, "execvp", lambda exe, argv: calls.append(argv))
    assert cli.main(["submit", "--runtime-env", str(env_file), "--", "python", "x.py"]) == 0
    assert calls[0][1:] == ["job", "submit", "--runtime-env", str(env_file), "--", "python", "x.py"]
    env_file.write_text(f"working_dir: {wd}\n")  # without the excludes: refused
    assert cli.main(["submit", f"--runtime-env={env_file}", "--", "python", "x.py"]) == 2


def test_a_remote_working_dir_is_passed_through(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execvp", lambda exe, argv: calls.append(argv))
    assert submit(["--working-dir", "s3://bucket/app.zip", "--", "python", "x.py"]) == 0
    assert calls[0][3:5] == ["--working-dir", "s3://bucket/app.zip"]


@pytest.mark.parametrize(
    "args",
    [
        ["python", "x.py"],
        ["--working-dir", ".", "--"],
        ["--working-dir", "--", "x"],
        ["--runtime-env-json", "{not json", "--", "x"],
        ["--runtime-env", "/no/such/env.yaml", "--", "x"],
        ["--runtime-env-json", "[1, 2]", "--", "x"],
    ],
)
def test_bad_submit_usage_is_a_clear_error(args):
    with pytest.raises(UploadError):
        submit(args)
