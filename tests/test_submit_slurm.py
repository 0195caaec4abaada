"""sbatch rendering: content, quoting/rejection of hostile values, signal forwarding, submission.

The rendered script is executed for real with bash, with fake ``srun``/``scontrol`` on PATH,
so the tests show what the quoting does (not only that ``bash -n`` accepts it). No Slurm needed.
"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dist_llm.config.schema import JobConfig
from dist_llm.launch.env import EXIT_PREEMPTED, port_from_job_id
from dist_llm.submit.slurm import SbatchValueError, render_sbatch, submit_slurm, training_overrides

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")

INJECTIONS = [
    '"; rm -rf ~',
    "x=\"; rm -rf ~\"",
    "train.sample.prompt=$(touch PWNED_dollar)",
    "train.sample.prompt=`touch PWNED_tick`",
    "train.sample.prompt='; touch PWNED_single; '",
    "name=a' ; touch PWNED_q ; echo '",
    "x=$HOME ${HOME} \\ * ? [a] ~ & | ; < > !",
]


def _set_launcher(cfg: JobConfig, field: str, value) -> None:
    """``nodes``/``tasks_per_node``/``master_port`` live in ``launcher``, the rest in ``launcher.slurm``."""
    target = cfg.launcher if field in ("nodes", "tasks_per_node", "master_port") else cfg.launcher.slurm
    assert hasattr(target, field), field
    setattr(target, field, value)


def cfg_(**launcher):
    cfg = JobConfig()
    cfg.name = "tiny"
    for k, v in launcher.items():
        _set_launcher(cfg, k, v)
    return cfg


def bash_n(script: str, tmp_path: Path) -> None:
    p = tmp_path / "check.sbatch"
    p.write_text(script)
    r = subprocess.run([BASH, "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_render_contains_the_launcher_settings(tmp_path):
    cfg = cfg_(nodes=2, tasks_per_node=4, cpus_per_task=3, gpus_per_node=4, partition="gpu,gpu-long",
               account="proj_1", qos="high", time="1-02:00:00", constraint="a100&ib", exclusive=True,
               signal_seconds=120, max_requeues=5, extra_sbatch=["--mail-type=END", "#SBATCH --mem=0"],
               setup=["module load cuda/12.1", "source /opt/venv/bin/activate"],
               srun_args=["--container-image=nvcr.io#nvidia/pytorch:24.01-py3"])
    cfg.output_dir = str(tmp_path / "runs")
    s = render_sbatch(cfg, ["model.n_layers=1", "launcher=local"], workdir=str(tmp_path))
    for line in ["#SBATCH --job-name=tiny", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --cpus-per-task=3", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu,gpu-long",
                 "#SBATCH --account=proj_1", "#SBATCH --qos=high", "#SBATCH --time=1-02:00:00",
                 "#SBATCH --constraint=a100&ib", "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --mail-type=END", "#SBATCH --mem=0",
                 f"#SBATCH --output={tmp_path}/runs/tiny-%j/slurm-%j.out", f"#SBATCH --chdir={tmp_path}",
                 "set -euo pipefail", "module load cuda/12.1", "export DIST_LLM_MAX_REQUEUES=5"]:
        assert line in s.splitlines(), line
    srun = [l for l in s.splitlines() if l.startswith("srun ")]
    assert len(srun) == 1
    assert srun[0].endswith("python -m dist_llm.cli.main train model.n_layers=1 launcher=slurm &")
    assert "'--container-image=nvcr.io#nvidia/pytorch:24.01-py3'" in srun[0]
    assert "launcher=local" not in s
    bash_n(s, tmp_path)


def test_render_defaults_and_no_signal(tmp_path):
    cfg = cfg_(requeue=False, signal_seconds=0, time="30")
    s = render_sbatch(cfg, [])
    assert "#SBATCH --no-requeue" in s and "--signal" not in s and "#SBATCH --time=30" in s
    assert "--partition" not in s and "--account" not in s and "--gpus-per-node" not in s
    bash_n(s, tmp_path)


def test_training_overrides_replace_launcher_choice():
    assert training_overrides(["a=1", "launcher=ray", "+launcher=x", "launcher.nodes=2"], "slurm") == [
        "a=1", "launcher.nodes=2", "launcher=slurm"]


@pytest.mark.parametrize("field,value", [
    ("name", '"; rm -rf ~'), ("name", "a\nrm -rf ~"), ("name", "$(touch /tmp/pwned)"), ("name", "`id`"),
    ("name", "a b"), ("name", ""), ("partition", "gpu; rm -rf ~"), ("partition", "gpu\n#SBATCH --x"),
    ("account", "$(id)"), ("qos", "a`id`"), ("time", "1:00; rm"), ("constraint", "a100 $(id)"),
    ("extra_sbatch", ["--mail-type=END\nrm -rf ~"]), ("extra_sbatch", ["rm -rf ~"]),
    ("setup", ["module load x\nrm -rf ~"]), ("srun_args", ["--x\n--y"]), ("nodes", 0), ("nodes", "2"),
    ("output_dir", "/tmp/has space"), ("output_dir", "/tmp/$(id)"), ("output_dir", "/tmp/x\ny"),
    ("master_port", 70000), ("cpus_per_task", 0),
])
def test_hostile_values_are_rejected(field, value):
    cfg = cfg_()
    if field in ("name", "output_dir"):
        setattr(cfg, field, value)
    else:
        _set_launcher(cfg, field, value)
    with pytest.raises(SbatchValueError) as e:
        render_sbatch(cfg, [])
    assert field.split("_")[0] in str(e.value)


@pytest.mark.parametrize("bad", ["a=1\nrm -rf ~", "a=\r", "a=\x00"])
def test_override_with_newline_is_rejected(bad):
    with pytest.raises(SbatchValueError, match="newline"):
        render_sbatch(cfg_(), [bad])


FAKE_SRUN = """#!{py}
import os, sys, signal, time
out = os.environ["FAKE_OUT"]
with open(os.path.join(out, "argv"), "wb") as f:
    f.write(b"\\0".join(a.encode() for a in sys.argv[1:]))
with open(os.path.join(out, "env"), "w") as f:
    f.write(os.environ.get("MASTER_ADDR", "?") + " " + os.environ.get("MASTER_PORT", "?"))
if os.environ.get("FAKE_WAIT_USR1"):
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    open(os.path.join(out, "ready"), "w").close()
    end = time.time() + 30
    while not got and time.time() < end:
        time.sleep(0.05)
    open(os.path.join(out, "got_usr1"), "w").write(str(got))
    sys.exit({code})
"""

FAKE_SCONTROL = """#!/bin/sh
if [ "$1 $2" = "show hostnames" ]; then printf 'node1\\nnode2\\n'; exit 0; fi
echo "unexpected scontrol $*" >&2; exit 1
"""


def _fake_bin(tmp_path: Path) -> Path:
    b = tmp_path / "bin"
    b.mkdir()
    (b / "srun").write_text(FAKE_SRUN.format(py=sys.executable, code=EXIT_PREEMPTED))
    (b / "scontrol").write_text(FAKE_SCONTROL)
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def _env(tmp_path: Path, out: Path, **extra) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "canary").write_text("still here")
    env = {"PATH": f"{_fake_bin(tmp_path)}:/usr/bin:/bin", "HOME": str(home), "FAKE_OUT": str(out),
           "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node[1-2]"}
    env.update(extra)
    return env


def test_injection_strings_are_passed_verbatim_and_run_nothing(tmp_path):
    cfg = cfg_(setup=["true"])
    s = render_sbatch(cfg, INJECTIONS)
    bash_n(s, tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(s)
    out = tmp_path / "out"
    out.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path, out)
    r = subprocess.run([BASH, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = (out / "argv").read_bytes().split(b"\0")
    argv = [a.decode() for a in argv]
    i = argv.index("python")
    assert argv[i:] == ["python", "-m", "dist_llm.cli.main", "train", *INJECTIONS, "launcher=slurm"]
    assert (out / "env").read_text() == f"node1 {port_from_job_id('123')}"
    # nothing ran: no file appeared anywhere we can see, the home canary is intact
    assert sorted(p.name for p in work.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["argv", "env"]
    assert (tmp_path / "home" / "canary").read_text() == "still here"
    assert not list(tmp_path.rglob("PWNED*"))


def test_usr1_is_forwarded_to_the_step_and_exit_code_kept(tmp_path):
    s = render_sbatch(cfg_(), ["train.max_steps=3"])
    script = tmp_path / "job.sbatch"
    script.write_text(s)
    out = tmp_path / "out"
    out.mkdir()
    env = _env(tmp_path, out, FAKE_WAIT_USR1="1")
    p = subprocess.Popen([BASH, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 30
        while not (out / "ready").exists():
            assert time.time() < end and p.poll() is None, "fake srun never became ready"
            time.sleep(0.05)
        time.sleep(0.2)  # the batch shell is in `wait` by now
        t0 = time.time()
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert time.time() - t0 < 5
    assert p.returncode == EXIT_PREEMPTED, err
    assert (out / "got_usr1").read_text() == str([signal.SIGUSR1.value])
    assert "forwarding to the training step" in err and "exited with the preemption code 85" in err


def test_fixed_master_port(tmp_path):
    s = render_sbatch(cfg_(master_port=29555), [])
    assert "export MASTER_PORT=29555" in s.splitlines()


class FakeSlurm:
    def __init__(self, job_id="4242"):
        self.calls, self.job_id = [], job_id

    def __call__(self, cmd, **kw):
        assert isinstance(cmd, list) and not kw.get("shell")
        self.calls.append(cmd)
        if cmd[0] == "sbatch":
            assert Path(cmd[-1]).read_text().startswith("#!/bin/bash")
            return subprocess.CompletedProcess(cmd, 0, f"{self.job_id}\n", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_submit_holds_writes_script_into_run_dir_and_releases(tmp_path):
    cfg = cfg_()
    cfg.output_dir = str(tmp_path / "runs")
    fake = FakeSlurm()
    job = submit_slurm(cfg, ["model.n_layers=1"], runner=fake, stdout=open(os.devnull, "w"))
    assert job == "4242"
    assert fake.calls[0][:3] == ["sbatch", "--parsable", "--hold"]
    assert fake.calls[1] == ["scontrol", "release", "4242"]
    saved = tmp_path / "runs" / "tiny-4242" / "job.sbatch"
    assert saved.read_text() == render_sbatch(cfg, ["model.n_layers=1"])
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["tiny-4242"]


def test_submit_cancels_when_release_fails(tmp_path):
    cfg = cfg_()
    cfg.output_dir = str(tmp_path / "runs")

    def runner(cmd, **kw):
        if cmd[0] == "sbatch":
            return subprocess.CompletedProcess(cmd, 0, "77;cluster\n", "")
        if cmd[:2] == ["scontrol", "release"]:
            return subprocess.CompletedProcess(cmd, 1, "", "denied")
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    calls = []
    with pytest.raises(RuntimeError, match="denied"):
        submit_slurm(cfg, [], runner=runner)
    assert calls == [["scancel", "77"]]


def test_dry_run_prints_and_submits_nothing(tmp_path, capsys):
    cfg = cfg_()
    cfg.output_dir = str(tmp_path / "runs")
    fake = FakeSlurm()
    s = submit_slurm(cfg, ["a=1"], dry_run=True, runner=fake)
    assert fake.calls == [] and capsys.readouterr().out == s and not (tmp_path / "runs").exists()
