"""Unit tests of dist_llm.launch.slurm_requeue with a fake scontrol runner."""
import subprocess

import pytest

from dist_llm.launch.slurm_requeue import current_job_id, requeue_current_job


class FakeRunner:
    """Fake scontrol: `show job` answers JobState=<state>; `calls` records the requeue calls."""

    def __init__(self, rc=0, stderr="", exc=None, state="RUNNING"):
        self.calls, self.shows = [], []
        self.rc, self.stderr, self.exc, self.state = rc, stderr, exc, state

    def __call__(self, cmd, **kw):
        assert isinstance(cmd, list) and not kw.get("shell")
        if cmd[:3] == ["scontrol", "show", "job"]:
            self.shows.append(cmd)
            return subprocess.CompletedProcess(cmd, 0, f"JobId={cmd[3]} JobName=x\n   JobState={self.state} Reason=None", "")
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


def test_cancelled_job_is_not_requeued():
    """scancel sends SIGTERM, which the trainer treats as a preemption: a job that is being
    cancelled must not be requeued."""
    for state in ("COMPLETING", "CANCELLED", "PREEMPTED", "TIMEOUT"):
        r = FakeRunner(state=state)
        assert requeue_current_job({"SLURM_JOB_ID": "9"}, runner=r) is False
        assert r.calls == [] and r.shows == [["scontrol", "show", "job", "9"]]
    r = FakeRunner(state="RUNNING")
    assert requeue_current_job({"SLURM_JOB_ID": "9"}, runner=r) is True and len(r.calls) == 1


def test_unreadable_state_still_requeues():
    def runner(cmd, **kw):
        if cmd[1] == "show":
            raise subprocess.TimeoutExpired(cmd, 1)
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    calls = []
    assert requeue_current_job({"SLURM_JOB_ID": "9"}, runner=runner) is True
    assert calls == [["scontrol", "requeue", "9"]]
