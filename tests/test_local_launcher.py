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
