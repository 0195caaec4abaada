"""Ray job submission (fake client) and the `dist-llm submit` CLI (dry runs). No cluster needed."""
import shlex
import shutil
import subprocess
import sys

import pytest

from dist_llm.config.schema import DatasetSource, JobConfig
from dist_llm.submit.ray_job import (WORKING_DIR_EXCLUDES, absolutize_paths, resolve_address, submit_ray_job,
                                     training_entrypoint)


class FakeClient:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kw):
        self.calls.append(kw)
        return kw["submission_id"]


def test_entrypoint_quotes_every_override():
    ov = ['x="; rm -rf ~"', "y=$(touch /tmp/pwned)", "z=`id`", "launcher=local"]
    ep = training_entrypoint(ov)
    assert shlex.split(ep) == ["python", "-m", "dist_llm.cli.main", "train", *ov[:3], "launcher=ray"]


def test_entrypoint_runs_nothing_in_a_shell(tmp_path):
    ep = training_entrypoint([f"y=$(touch {tmp_path}/pwned)", f"z=`touch {tmp_path}/pwned2`; touch {tmp_path}/p3"],
                             python="echo")
    r = subprocess.run(["bash", "-c", ep], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and list(tmp_path.iterdir()) == []
    assert f"$(touch {tmp_path}/pwned)" in r.stdout


def test_newline_override_rejected():
    with pytest.raises(ValueError, match="newline"):
        submit_ray_job(JobConfig(), ["a=1\nb"], address="http://127.0.0.1:8265", client=FakeClient())


def test_address_resolution(monkeypatch):
    cfg = JobConfig()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="RAY_ADDRESS"):
        resolve_address(cfg)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert resolve_address(cfg) == "http://10.0.0.1:8265"
    cfg.launcher.ray.address = "127.0.0.1:8265"
    assert resolve_address(cfg) == "http://127.0.0.1:8265"
    assert resolve_address(cfg, "https://h:1") == "https://h:1"


def test_submit_local_absolutizes_output_dir_and_sets_runtime_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = JobConfig()
    cfg.name = "tiny"
    client = FakeClient()
    sid = submit_ray_job(cfg, ["model.n_layers=1"], address="http://127.0.0.1:8265", client=client,
                         env_vars={"A": "1"})
    (call,) = client.calls
    assert sid == call["submission_id"] and sid.startswith("dist-llm-tiny-")
    args = shlex.split(call["entrypoint"])
    assert args[:4] == ["python", "-m", "dist_llm.cli.main", "train"]
    assert f"output_dir={tmp_path / 'runs'}" in args and args[-1] == "launcher=ray"
    env = call["runtime_env"]
    assert env["env_vars"]["A"] == "1" and env["env_vars"]["DIST_LLM_JOB_ID"] in sid
    assert env["excludes"] == WORKING_DIR_EXCLUDES and "/data" in env["excludes"] and "data" not in env["excludes"]


def test_submit_remote_rejects_relative_output_dir():
    with pytest.raises(ValueError, match="storage every Ray node sees"):
        submit_ray_job(JobConfig(), [], address="http://10.1.2.3:8265", client=FakeClient())
    cfg = JobConfig()
    cfg.output_dir = "/shared/runs"
    client = FakeClient()
    submit_ray_job(cfg, [], address="http://10.1.2.3:8265", client=client)
    assert "output_dir=" not in client.calls[0]["entrypoint"]


def test_absolutize_paths(tmp_path):
    cfg = JobConfig()
    cfg.data.train = [DatasetSource(path="d/train"), DatasetSource(path="/abs/x"), DatasetSource(path="s3://b/k")]
    cfg.data.val = "d/val"
    out = absolutize_paths(cfg, str(tmp_path))
    assert out.output_dir == str(tmp_path / "runs")
    assert [s.path for s in out.data.train] == [str(tmp_path / "d/train"), "/abs/x", "s3://b/k"]
    assert out.data.val == str(tmp_path / "d/val") and out.data.embedded_dir == str(tmp_path / "data/stdlib")
    assert cfg.output_dir == "runs"  # the input is not modified


# ---------------------------------------------------------------- CLI
def cli(*args):
    return subprocess.run([sys.executable, "-m", "dist_llm.cli.main", "submit", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_slurm_dry_run_prints_a_valid_script(tmp_path):
    r = cli("slurm", "--dry-run", "launcher.nodes=2", "launcher.slurm.partition=gpu", "train.max_steps=5",
            "train.sample.prompt='a b; $(touch x)'")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "#SBATCH --partition=gpu" in r.stdout
    p = tmp_path / "s.sbatch"
    p.write_text(r.stdout)
    assert subprocess.run(["bash", "-n", str(p)]).returncode == 0
    srun = [l for l in r.stdout.splitlines() if l.startswith("srun ")][0]
    assert shlex.split(srun)[-3:] == ["train.sample.prompt='a b; $(touch x)'", "launcher=slurm", "&"]


def test_cli_rejects_hostile_name_and_bad_usage():
    r = cli("slurm", "--dry-run", 'name="x; rm -rf ~"')
    assert r.returncode == 2 and "name=" in r.stderr and "not allowed" in r.stderr
    assert cli("pbs").returncode == 2
    assert cli("slurm", "--bogus").returncode == 2


def test_cli_ray_dry_run():
    r = cli("ray", "--dry-run", "--address", "http://127.0.0.1:8265", "launcher.ray.num_workers=2")
    assert r.returncode == 0, r.stderr
    assert "entrypoint: python -m dist_llm.cli.main train launcher.ray.num_workers=2" in r.stdout
