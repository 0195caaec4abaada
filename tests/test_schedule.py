import math

import pytest

from dist_llm.config.schema import OptimConfig
from dist_llm.train.schedule import lr_at


def test_warmup_then_cosine_to_floor():
    opt = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine")
    assert lr_at(0, opt, 110) == pytest.approx(0.1)
    assert lr_at(9, opt, 110) == pytest.approx(1.0)
    assert lr_at(60, opt, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2)
    assert lr_at(110, opt, 110) == pytest.approx(0.1)
    assert lr_at(500, opt, 110) == pytest.approx(0.1)  # stays at the floor


def test_linear_and_constant():
    lin = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0, decay="linear")
    assert [lr_at(s, lin, 4) for s in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    const = OptimConfig(lr=0.5, warmup_steps=2, decay="constant")
    assert [lr_at(s, const, 10) for s in range(4)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


def test_monotone_after_warmup():
    opt = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5)
    lrs = [lr_at(s, opt, 100) for s in range(5, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and not any(math.isnan(x) for x in lrs)
