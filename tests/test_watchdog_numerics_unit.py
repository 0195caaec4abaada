"""In-process / one-process checks of the hang watchdog and the numerics gate (no lock needed).

* The watchdog in a real child process that stops beating: it exits with EXIT_HANG within a
  few seconds, the log names the rank, the step and the phase, and stderr holds the Python
  stack of every thread (the main thread's frame included).
* The gate: non-finite numbers are withheld, a spike over the running median is withheld once
  the window is full, the window survives a state round trip, and the policy of a withheld step
  is the one configured for its cause.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

from dist_llm.config.schema import NumericsPolicy, SpikeConfig, TrainConfig
from dist_llm.train.numerics import NumericsGate
from dist_llm.train.watchdog import EXIT_HANG

CHILD = textwrap.dedent("""
    import logging, sys, threading, time
    from dist_llm.train.watchdog import Watchdog
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threading.Thread(target=time.sleep, args=(60,), name="helper-thread", daemon=True).start()
    dog = Watchdog(rank=3, timeout_s=1.5, poll_s=0.1)
    dog.start()
    for i in range(5):  # beating: no fire
        dog.beat(6, "backward"); time.sleep(0.5)
    dog.beat(7, "all_reduce:loss+nonfinite")
    def stuck_in_collective():
        time.sleep(60)
    stuck_in_collective()
    sys.exit(0)
""")


def test_watchdog_ends_a_silent_rank_with_a_named_phase_and_all_stacks():
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == EXIT_HANG, p.stderr[-3000:]
    assert took < 20, took  # 2.5 s of beats + 1.5 s silence + start-up; far below the 60 s sleep
    assert "rank 3 hung at step 7 in phase all_reduce:loss+nonfinite" in p.stderr
    assert "stuck_in_collective" in p.stderr  # the main thread's stack
    assert p.stderr.lower().count("thread 0x") >= 3  # every thread: main, helper, the watchdog itself


def _gate(**spike) -> NumericsGate:
    return NumericsGate(TrainConfig(nonfinite=NumericsPolicy["raise"],
                                    spike=SpikeConfig(**{"policy": NumericsPolicy.skip, **spike})))


def test_gate_withholds_non_finite_and_names_the_policy():
    g = _gate()
    assert g.allow(2.0, True)
    assert not g.allow(math.nan, False) and "non-finite" in g.reason
    assert g.policy(finite=False) == "raise"
    assert not g.allow(2.0, False)  # finite loss, a non-finite gradient somewhere


def test_spike_detector_uses_the_median_of_a_full_window_and_survives_a_round_trip():
    g = _gate(factor=3.0, window=4)
    assert g.allow(10.0, True)  # window not full: no judgement
    for x in (2.0, 2.0, 2.0):
        assert g.allow(x, True)
    assert g.allow(5.9, True)  # median of [10, 2, 2, 2] is 2: 5.9 < 6
    assert not g.allow(6.5, True) and "spike" in g.reason and g.policy(finite=True) == "skip"
    h = _gate(factor=3.0, window=4)
    h.load_state(g.state())
    assert list(h.history) == list(g.history) == [2.0, 2.0, 2.0, 5.9]  # the spike was not recorded
    assert not h.allow(6.5, True) and h.allow(4.0, True)


def test_fault_and_numerics_settings_are_validated_before_any_process_group():
    import pytest

    from dist_llm.config.store import compose
    from dist_llm.config.validate import ConfigError, validate

    cfg = compose(["debug=nonfinite", "train.nonfinite=skip"])
    assert cfg.debug.enabled and cfg.debug.nan_at_step == 25 and str(cfg.train.nonfinite) == "skip"
    assert not compose([]).debug.enabled  # off by default
    with pytest.raises(ConfigError) as e:
        validate(compose(["debug.sleep_at_step=3", "debug.fault_rank=5", "train.spike.factor=0.5",
                          "train.hang_timeout_s=-1"]), 2)
    msg = str(e.value)
    for field in ("debug.fault_rank=5", "debug.sleep_at_step=3 needs debug.sleep_s", "train.spike.factor=0.5",
                  "train.hang_timeout_s=-1"):
        assert field in msg, msg


def test_loss_fault_injection_is_refused_on_the_pipeline_engine():
    """The pipeline schedule runs backward inside Megatron, so the loss hook that injects NaNs and
    spikes never runs at pp > 1: refused at validation rather than silently doing nothing."""
    import pytest

    from dist_llm.config.store import compose
    from dist_llm.config.validate import ConfigError, validate

    for fault in ("debug.nan_at_step=3", "debug.spike_at_step=3"):
        with pytest.raises(ConfigError, match="not injected by the pipeline engine"):
            validate(compose(["parallel=pp2", fault]), 2)
    validate(compose(["parallel=pp2"]), 2)  # no fault: fine
