"""Render and submit the sbatch script of a training job (``dist-llm submit slurm``).

The rendered script (the template ``job.sbatch.tmpl`` next to this module) is thin: ``#SBATCH``
lines from ``cfg.launcher.slurm``, the user's environment
setup lines, ``MASTER_ADDR``/``MASTER_PORT``, and one ``srun`` of the training entrypoint with
the Hydra overrides. Every rank is one srun task; the launch contract
(:func:`dist_llm.launch.env.read_launch_env`) maps Slurm's variables to ranks.

Preemption / time limit: ``--signal=B:USR1@<signal_seconds>`` reaches the batch shell, whose
trap forwards USR1 to the srun step (bash runs a trap only while it sits in ``wait``, hence
``srun ... &`` and a ``wait`` loop). The trainer saves a committed checkpoint, rank 0 runs
``scontrol requeue`` (see :mod:`dist_llm.launch.slurm_requeue`), and the requeued job resumes
from that checkpoint (``train.checkpoint.resume=auto``; the run directory is keyed by the job id, which a
requeue keeps).

Quoting: values that go into ``#SBATCH`` lines must match a conservative pattern or are
rejected (:class:`SbatchValueError`); overrides and srun arguments are ``shlex.quote``-d;
control characters (newlines above all) are rejected everywhere. ``launcher.slurm.setup`` lines are
the one exception by design: they are shell commands the user writes (``module load ...``,
``source .venv/bin/activate``), as trusted as a hand-written sbatch script; they are still
checked to be single lines.
"""
from __future__ import annotations

import os
import re
import shlex
import string
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

from dist_llm.config.plan import run_dir_for
from dist_llm.config.schema import JobConfig
from dist_llm.launch.env import EXIT_PREEMPTED
from dist_llm.observability.redact import redact_text

ENTRYPOINT = ("-m", "dist_llm.cli.main", "train")

# Conservative patterns for values written into #SBATCH lines (sbatch parses those itself).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")  # job name == run name
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")  # account, qos
_PARTITION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*(,[A-Za-z0-9][A-Za-z0-9_.+-]*)*")
_TIME_RE = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE|infinite|unlimited")
# Node features: name, &, |, *N counts, [ ] brackets, parentheses.
_CONSTRAINT_RE = re.compile(r"[A-Za-z0-9_.,&|*\[\]()!:+-]+")
_PATH_RE = re.compile(r"/?[A-Za-z0-9_.+,=@-]+(/[A-Za-z0-9_.+,=@-]+)*/?")
_EXTRA_RE = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*([= ][^\x00-\x1f\x7f]*)?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class SbatchValueError(ValueError):
    """A config value that cannot be put into an sbatch script safely."""


def _check_line(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise SbatchValueError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    if _CONTROL_RE.search(value):
        raise SbatchValueError(f"{what}={value!r} contains a newline or another control character; "
                               "each value must be a single line")
    return value


def _check(what: str, value: str, pattern: re.Pattern, hint: str) -> str:
    _check_line(what, value)
    if not pattern.fullmatch(value):
        raise SbatchValueError(f"{what}={value!r} is not allowed in an sbatch script ({hint})")
    return value


def _check_int(what: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SbatchValueError(f"{what}={value!r} must be an integer >= {minimum}")
    return value


def check_overrides(overrides: Iterable[str]) -> List[str]:
    out = []
    for o in overrides:
        _check_line("override", o)
        out.append(o)
    return out


def training_overrides(overrides: Sequence[str], launcher: str) -> List[str]:
    """The user's overrides with any ``launcher=<x>`` choice replaced by ``launcher=<launcher>``
    (Hydra rejects two values for one group)."""
    kept = [o for o in check_overrides(overrides)
            if not re.match(r"^[+~]*launcher=", o)]
    return kept + [f"launcher={launcher}"]


def run_dir_pattern(cfg: JobConfig, job_id: str = "%j") -> str:
    """The run directory with Slurm's ``%j`` for the job id (absolute, as sbatch needs it): the
    rule of :func:`dist_llm.config.plan.run_dir_for`, with ``%j`` left for sbatch to fill in."""
    return f"{run_dir_for(os.path.abspath(cfg.output_dir), cfg.name, None)}-{job_id}"


def _sbatch_options(cfg: JobConfig, name: str, nodes: int, tpn: int, cpt: int, workdir: str) -> List[str]:
    """The ``#SBATCH`` options, each value checked against a conservative pattern."""
    sl = cfg.launcher.slurm
    gpn = _check_int("launcher.slurm.gpus_per_node", sl.gpus_per_node, 0)
    sb: List[str] = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tpn}",
        f"--cpus-per-task={cpt}",
    ]
    if gpn:
        sb.append(f"--gpus-per-node={gpn}")
    if sl.partition:
        sb.append(f"--partition={_check('launcher.slurm.partition', sl.partition, _PARTITION_RE, 'names of letters, digits, _.+-, comma separated')}")
    if sl.account:
        sb.append(f"--account={_check('launcher.slurm.account', sl.account, _TOKEN_RE, 'letters, digits and _.+-')}")
    if sl.qos:
        sb.append(f"--qos={_check('launcher.slurm.qos', sl.qos, _TOKEN_RE, 'letters, digits and _.+-')}")
    if sl.time:
        sb.append(f"--time={_check('launcher.slurm.time', sl.time, _TIME_RE, 'minutes, MM:SS, HH:MM:SS or D-HH:MM:SS')}")
    if sl.constraint:
        sb.append(f"--constraint={_check('launcher.slurm.constraint', sl.constraint, _CONSTRAINT_RE, 'feature names with & | , * [ ] ( ) only')}")
    if sl.exclusive:
        sb.append("--exclusive")
    sb.append("--requeue" if sl.requeue else "--no-requeue")
    sig = _check_int("launcher.slurm.signal_seconds", sl.signal_seconds, 0)
    if sig:
        sb.append(f"--signal=B:USR1@{sig}")
    run_dir = run_dir_pattern(cfg)
    sb += [
        f"--chdir={workdir}",
        f"--output={run_dir}/slurm-%j.out",
        f"--error={run_dir}/slurm-%j.err",
        "--open-mode=append",  # a requeued job appends to its logs
    ]
    for line in sl.extra_sbatch:
        _check_line("launcher.slurm.extra_sbatch", line)
        line = line.strip()
        if line.startswith("#SBATCH"):
            line = line[len("#SBATCH"):].strip()
        _check("launcher.slurm.extra_sbatch", line, _EXTRA_RE, "one sbatch option per line, like --mail-type=END")
        sb.append(line)
    return sb


def render_sbatch(cfg: JobConfig, overrides: Sequence[str], python: str = "python",
                  workdir: Optional[str] = None) -> str:
    """The sbatch script of ``cfg`` (``cfg.launcher`` holds the Slurm settings).

    ``overrides`` are the Hydra overrides every rank composes its config from (the same the user
    gave ``dist-llm submit slurm``); ``launcher=slurm`` is appended. ``workdir`` (default: the
    current directory) is where the job runs, so relative paths in the config resolve alike.
    Raises :class:`SbatchValueError` naming the first value that is not safe to render.
    """
    la, sl = cfg.launcher, cfg.launcher.slurm
    name = _check("name", cfg.name, _NAME_RE,
                  "letters, digits and _.+- only, starting with a letter or digit, at most 128")
    nodes = _check_int("launcher.nodes", la.nodes, 1)
    tpn = _check_int("launcher.tasks_per_node", la.tasks_per_node, 1)
    cpt = _check_int("launcher.slurm.cpus_per_task", sl.cpus_per_task, 1)
    max_rq = sl.max_requeues
    if isinstance(max_rq, bool) or not isinstance(max_rq, int):
        raise SbatchValueError(f"launcher.slurm.max_requeues={max_rq!r} must be an integer (-1 = unlimited)")
    port = _check_int("launcher.master_port", la.master_port, 0)
    if port > 65535:
        raise SbatchValueError(f"launcher.master_port={port} is not a TCP port")
    workdir = os.path.abspath(workdir or os.getcwd())
    _check("working directory", workdir, _PATH_RE,
           "letters, digits and _.+,=@- path components only; run from a plainer path")
    _check("output_dir", os.path.abspath(cfg.output_dir), _PATH_RE,
           "letters, digits and _.+,=@- path components only (no spaces, %, quotes)")
    _check("python", python, _PATH_RE, "an interpreter name or path")

    sb = _sbatch_options(cfg, name, nodes, tpn, cpt, workdir)
    setup = [_check_line("launcher.slurm.setup", s) for s in sl.setup]
    srun_args = [_check_line("launcher.slurm.srun_args", a) for a in sl.srun_args]
    train_args = training_overrides(overrides, "slurm")

    srun = ["srun", f"--nodes={nodes}", f"--ntasks-per-node={tpn}", f"--cpus-per-task={cpt}",
            # a rank exiting first (e.g. with the preemption code) must not kill rank 0 before it
            # has requeued; a crashed rank fails the others through the collective timeout.
            "--kill-on-bad-exit=0", *srun_args, python, *ENTRYPOINT, *train_args]
    srun_line = " ".join(shlex.quote(a) for a in srun)
    if port:
        port_line = f"export MASTER_PORT={port}"
    else:
        # same rule as dist_llm.launch.env.port_from_job_id (base 20000, span 20000)
        port_line = 'export MASTER_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))'

    return _SbatchTemplate(_template_text()).substitute(
        name=name, sbatch_lines="".join(f"#SBATCH {s}\n" for s in sb), setup_lines="".join(f"{s}\n" for s in setup),
        max_requeues=max_rq, port_line=port_line, srun_line=srun_line, exit_preempted=EXIT_PREEMPTED)



class _SbatchTemplate(string.Template):
    """``@name`` placeholders: the script is full of the shell's own ``$`` expansions."""

    delimiter = "@"


def _template_text() -> str:
    return resources.files("dist_llm.submit").joinpath("job.sbatch.tmpl").read_text(encoding="utf-8")


def _parse_job_id(stdout: str) -> str:
    job_id = stdout.strip().split(";")[0].strip()
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise RuntimeError(f"sbatch --parsable printed {stdout!r}, not a job id")
    return job_id


def submit_slurm(cfg: JobConfig, overrides: Sequence[str], dry_run: bool = False,
                 runner: Callable[..., "subprocess.CompletedProcess"] = subprocess.run,
                 python: str = "python", stdout=None) -> str:
    """Submit ``cfg`` with ``sbatch --parsable``; returns the job id (or the script, dry run).

    The job is submitted held, its run directory ``<output_dir>/<name>-<job id>`` is created
    (Slurm does not create the directories of ``--output``), the script is stored there as
    ``job.sbatch``, and the job is released.
    """
    script = redact_text(render_sbatch(cfg, overrides, python=python))  # secrets come from the environment
    if dry_run:
        print(script, file=stdout or sys.stdout, end="")
        return script
    out_dir = Path(cfg.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cfg.name}-", suffix=".sbatch", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(script)
    os.chmod(tmp, 0o700)  # may name site details; sbatch needs no other reader

    def run(cmd: List[str]) -> "subprocess.CompletedProcess":
        proc = runner(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or '').strip()}")
        return proc

    try:
        job_id = _parse_job_id(run(["sbatch", "--parsable", "--hold", tmp]).stdout)
    except Exception:
        os.unlink(tmp)
        raise
    try:
        run_dir = Path(run_dir_pattern(cfg, job_id))
        run_dir.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, run_dir / "job.sbatch")
        run(["scontrol", "release", job_id])
    except Exception:
        runner(["scancel", job_id], capture_output=True, text=True, check=False)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"submitted Slurm job {job_id}; run directory {run_dir}", file=stdout or sys.stderr)
    return job_id
