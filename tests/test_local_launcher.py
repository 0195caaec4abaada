"""The mock-cluster launcher never leaves a job hanging: a failed rank takes the others down."""
import signal
import time

from dist_llm.launch.local import spawn_local


def test_all_ranks_succeed():
    code = spawn_local(3, ["-c", "import os; assert os.environ['WORLD_SIZE'] == '3'; "
                                 "assert os.environ['RANK'] == os.environ['LOCAL_RANK']"])
    assert code == 0


def test_failed_rank_kills_the_rest_quickly():
    t0 = time.monotonic()
    code = spawn_local(2, ["-c", "import os, time\n"
                                 "if os.environ['RANK'] == '1': time.sleep(0.3); os._exit(7)\n"
                                 "time.sleep(120)  # a peer stuck in a collective"])
    assert code == 7
    assert time.monotonic() - t0 < 15  # killed after the grace period, not after 120 s


def test_signal_death_reported_as_128_plus_signal():
    code = spawn_local(2, ["-c", "import os, signal, time\n"
                                 "if os.environ['RANK'] == '0': os.kill(os.getpid(), signal.SIGKILL)\n"
                                 "time.sleep(120)"])
    assert code == 128 + signal.SIGKILL


RANK_END = """
import atexit, sys, threading, time
import dist_llm.cli.main as cli
atexit.register(lambda: print("exit handler ran", flush=True))
sys.stdout.write("buffered line, no newline flush")  # must still reach the parent
sys.argv = ["dist-llm", "worker", "cfg.yaml"]
if {thread}:
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
cli.main = lambda: 85  # a rank's run returned the preemption code
cli.entry()
"""


def test_a_worker_rank_ends_with_its_code_after_exit_handlers_and_flushed_output():
    """The rank's fast end (os._exit after the run): its exit code, atexit handlers and buffered
    stdout survive; a non-daemon thread still running keeps the ordinary exit, which waits for it."""
    import subprocess
    import sys

    for thread in (False, True):
        p = subprocess.run([sys.executable, "-c", RANK_END.format(thread=thread)], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 85, p.stderr[-2000:]
        assert "buffered line" in p.stdout and "exit handler ran" in p.stdout, p.stdout
        assert ("thread finished" in p.stdout) == thread, p.stdout
