"""Issue 9, Fix 7: preemption off the main thread (Ray Train runs the train function in a thread).

Python installs signal handlers only from the main thread. Installing from a worker thread must
say so (a warning naming the thread and the reason and the way out), and the request file
``<run_dir>/PREEMPT`` must work there: every rank agrees on it at the next step and it is
consumed, so the requeued job does not stop again at once. The file path is also exercised end
to end on 2 real ranks in tests/test_faults_restart.py.
"""
from __future__ import annotations

import logging
import signal
import threading

from dist_llm.train.preempt import PREEMPT_FILE, PreemptionFlag


class _OneRank:
    world_size = 1

    def agree(self, flag: bool) -> bool:
        return bool(flag)


def _in_thread(fn):
    out = {}

    def run():
        out["value"] = fn()

    t = threading.Thread(target=run, name="RayTrainWorker")
    t.start()
    t.join(10)
    return out["value"]


def test_off_main_thread_install_is_loud_and_the_file_preempts(tmp_path, caplog):
    before = signal.getsignal(signal.SIGUSR1)
    flag = PreemptionFlag(tmp_path / PREEMPT_FILE)
    with caplog.at_level(logging.WARNING, logger="dist_llm.train"):
        _in_thread(flag.install)
    assert not flag.installed and signal.getsignal(signal.SIGUSR1) is before
    msg = caplog.text
    assert "cannot install SIGUSR1/SIGTERM" in msg and "RayTrainWorker" in msg and "main thread" in msg
    assert str(tmp_path / PREEMPT_FILE) in msg  # says how to preempt instead

    layout = _OneRank()
    assert _in_thread(lambda: flag.agreed(layout)) is False
    (tmp_path / PREEMPT_FILE).touch()
    assert _in_thread(lambda: flag.agreed(layout)) is True
    assert not (tmp_path / PREEMPT_FILE).exists()  # consumed
    assert _in_thread(lambda: flag.agreed(layout)) is False


def test_main_thread_install_catches_the_signal(tmp_path):
    import os

    flag = PreemptionFlag(tmp_path / PREEMPT_FILE).install()
    try:
        assert flag.installed
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signum == signal.SIGUSR1 and flag.agreed(_OneRank())
    finally:
        flag.uninstall()


def test_ask_samples_when_asked_with_several_ranks_and_when_answered_alone(tmp_path):
    """The trainer's per-step form. Several ranks: the view is taken when asked (its all-reduce
    runs during the step) and the file consumed when answered. One rank: nothing to agree, so the
    view is read when answered (acted on at the very next step boundary)."""
    class _TwoRanks:  # this rank's flag is what the (recorded) all-reduce returns
        world_size = 2

        def agree_later(self, flag: bool):
            return lambda: bool(flag)

    flag = PreemptionFlag(tmp_path / PREEMPT_FILE)
    before = flag.ask(_TwoRanks())
    (tmp_path / PREEMPT_FILE).touch()
    assert before() is False and (tmp_path / PREEMPT_FILE).exists()  # asked before the request
    after = flag.ask(_TwoRanks())
    assert after() is True and not (tmp_path / PREEMPT_FILE).exists()
    assert flag.ask(_TwoRanks())() is False

    alone = flag.ask(_OneRank())
    (tmp_path / PREEMPT_FILE).touch()
    assert alone() is True and not (tmp_path / PREEMPT_FILE).exists()
