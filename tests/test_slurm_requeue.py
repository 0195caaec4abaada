"""Unit tests of dist_llm.launch.slurm_requeue with a fake scontrol runner."""
import subprocess

import pytest

from dist_llm.launch.slurm_requeue import current_job_id, requeue_current_job


class FakeRunner:
    def __init__(self, rc=0, stderr="", exc=None):
        self.calls = []
        self.rc, self.stderr, self.exc = rc, stderr, exc

    def __call__(self, cmd, **kw):
        self.calls.append((cmd, kw))
        if self.exc:
            raise self.exc
        return subprocess.CompletedProcess(cmd, self.rc, "", self.stderr)


def test_requeues_plain_job_as_arg_list():
    r = FakeRunner()
    assert requeue_current_job({"SLURM_JOB_ID": "4242"}, runner=r) is True
    (cmd, kw), = r.calls
    assert cmd == ["scontrol", "requeue", "4242"]
    assert not kw.get("shell")


def test_array_task_uses_array_ids():
    r = FakeRunner()
    env = {"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"}
    assert requeue_current_job(env, runner=r)
    assert r.calls[0][0] == ["scontrol", "requeue", "4242_7"]
    assert current_job_id(env) == "4242_7"


@pytest.mark.parametrize("bad", ["12; rm -rf ~", "$(touch /tmp/x)", "12\n13", "12_", "_3", "abc", "12 13",
                                 "`id`", "1_2_3", "-1"])
def test_malformed_job_id_is_refused(bad):
    r = FakeRunner()
    assert requeue_current_job({"SLURM_JOB_ID": bad}, runner=r) is False
    assert r.calls == []
    with pytest.raises(ValueError):
        current_job_id({"SLURM_JOB_ID": bad})


def test_malformed_array_task_is_refused():
    r = FakeRunner()
    env = {"SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3;reboot"}
    assert requeue_current_job(env, runner=r) is False and r.calls == []


def test_not_under_slurm():
    r = FakeRunner()
    assert requeue_current_job({}, runner=r) is False and r.calls == []
    assert current_job_id({}) is None


def test_cap_from_argument_and_env():
    r = FakeRunner()
    assert requeue_current_job({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2"}, runner=r, max_requeues=2) is False
    assert requeue_current_job({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"}, runner=r, max_requeues=2) is True
    env = {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1", "DIST_LLM_MAX_REQUEUES": "1"}
    assert requeue_current_job(env, runner=r) is False
    env["DIST_LLM_MAX_REQUEUES"] = "-1"  # unlimited
    env["SLURM_RESTART_COUNT"] = "99"
    assert requeue_current_job(env, runner=r) is True
    # default cap 3
    assert requeue_current_job({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "3"}, runner=r) is False
    assert requeue_current_job({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2"}, runner=r) is True
    assert len(r.calls) == 3


def test_scontrol_failure_and_missing_binary_return_false():
    assert requeue_current_job({"SLURM_JOB_ID": "5"}, runner=FakeRunner(rc=1, stderr="Invalid job id")) is False
    assert requeue_current_job({"SLURM_JOB_ID": "5"}, runner=FakeRunner(exc=FileNotFoundError("scontrol"))) is False
    assert requeue_current_job({"SLURM_JOB_ID": "5"},
                               runner=FakeRunner(exc=subprocess.TimeoutExpired("scontrol", 1))) is False
