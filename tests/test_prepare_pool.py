"""The local prepare engine's worker pool ends cleanly however its phase ends: all results read,
the reader stopping early, or a task failing, even when the driver process carries a Python
SIGTERM handler (a launcher's, Ray's) that forked workers inherit. Before the fix the pool was
always ended with ``terminate()``; a worker that ignored SIGTERM (inherited handler) or died
holding the task queue's lock left ``join`` waiting forever (a prepare test hung 10 min).
Each case runs in a child process with a timeout, so a regression fails instead of hanging."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import signal, sys, time
    from dist_llm.prepare.engines import LocalEngine

    signal.signal(signal.SIGTERM, lambda *a: None)  # as Ray or a launcher would install

    def init(arg):
        global OFFSET
        OFFSET = arg

    def square(x):
        if x == FAIL_AT:
            raise ValueError(f"task {x} failed")
        time.sleep(0.01)
        return x * x + OFFSET

    FAIL_AT = int(sys.argv[2])
    engine = LocalEngine(2)
    case = sys.argv[1]
    if case == "all":
        print(list(engine.map_ordered_bounded(init, 1, square, range(20))))
    elif case == "early":
        gen = engine.map_ordered_bounded(init, 1, square, range(1000))
        print([next(gen) for _ in range(3)])
        gen.close()
        print("closed")
    else:
        try:
            list(engine.map_ordered_bounded(init, 1, square, range(20)))
        except ValueError as e:
            print("raised", e)
""")


@pytest.mark.parametrize("case,fail_at,expect", [
    ("all", -1, str([x * x + 1 for x in range(20)])),
    ("early", -1, "closed"),
    ("error", 7, "raised task 7 failed"),
])
def test_pool_ends_cleanly_with_an_inherited_sigterm_handler(tmp_path, case, fail_at, expect):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    p = subprocess.run([sys.executable, str(script), case, str(fail_at)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert expect in p.stdout, p.stdout
