"""parallel.zero.* (DeepSpeed's ZeRO bucket and ZeRO-3 gather limits) reach the DeepSpeed config
dict, keep DeepSpeed's defaults when unset, and a bad value fails validation with the fix."""
from __future__ import annotations

import pytest

from dist_llm.config.store import compose
from dist_llm.config.validate import ConfigError, validate
from dist_llm.parallel.deepspeed_common import deepspeed_config

SMALL = ["parallel.zero.reduce_bucket_size=1000000", "parallel.zero.allgather_bucket_size=2000000",
         "parallel.zero.prefetch_bucket_size=300000", "parallel.zero.param_persistence_threshold=4096",
         "parallel.zero.max_live_parameters=5000000", "parallel.zero.max_reuse_distance=0"]


def test_zero3_fields_reach_the_deepspeed_config_and_deepspeed_accepts_them():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = compose(["parallel=zero3", *SMALL])
    validate(cfg, world_size=2)
    zero = deepspeed_config(cfg, 2)["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 1_000_000, "allgather_bucket_size": 2_000_000,
                    "stage3_prefetch_bucket_size": 300_000, "stage3_param_persistence_threshold": 4096,
                    "stage3_max_live_parameters": 5_000_000, "stage3_max_reuse_distance": 0}
    parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed reads them under these names
    assert (parsed.reduce_bucket_size, parsed.allgather_bucket_size, parsed.prefetch_bucket_size,
            parsed.param_persistence_threshold, parsed.max_live_parameters, parsed.max_reuse_distance) == \
        (1_000_000, 2_000_000, 300_000, 4096, 5_000_000, 0)


def test_defaults_are_deepspeeds_and_stage3_keys_only_at_stage3():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds_default = DeepSpeedZeroConfig()
    zero2 = deepspeed_config(compose(["parallel=zero2"]), 2)["zero_optimization"]
    assert zero2 == {"stage": 2, "reduce_bucket_size": ds_default.reduce_bucket_size,
                     "allgather_bucket_size": ds_default.allgather_bucket_size}
    zero3 = deepspeed_config(compose(["parallel=zero3"]), 2)["zero_optimization"]
    assert zero3["stage3_prefetch_bucket_size"] == ds_default.prefetch_bucket_size
    assert zero3["stage3_max_live_parameters"] == ds_default.max_live_parameters
    assert zero3["stage3_max_reuse_distance"] == ds_default.max_reuse_distance
    assert zero3["stage3_param_persistence_threshold"] == 0  # ours: partition every parameter


@pytest.mark.parametrize("field,value,least", [("reduce_bucket_size", 0, 1), ("allgather_bucket_size", -5, 1),
                                               ("max_live_parameters", 0, 1), ("prefetch_bucket_size", -1, 0)])
def test_bad_value_fails_validation_naming_the_field_and_the_fix(field, value, least):
    cfg = compose(["parallel=zero3", f"parallel.zero.{field}={value}"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2)
    msg = str(err.value)
    assert f"parallel.zero.{field}={value} must be an integer >= {least}" in msg
    assert "set it to a whole number such as" in msg


def test_a_float_is_rejected_at_composition():
    with pytest.raises(Exception, match="reduce_bucket_size"):
        compose(["parallel.zero.reduce_bucket_size=5e7"])


def test_the_planner_counts_the_configured_buffers():
    """The memory estimate (validate/doctor) reads the same fields: ZeRO-2 buckets of 100k
    elements instead of 5e8 on the ~0.8M-parameter demo model shrink the buffer term to exactly
    100k x 4 bytes (reduce) + 100k x 4 / dp (all-gather); the model states are unchanged."""
    from dist_llm.planner.memory import estimate_peak_memory

    base = ["parallel=zero2", "model=demo", "parallel.device=cpu"]
    default = estimate_peak_memory(compose(base), 2, device="cuda")
    small = estimate_peak_memory(compose([*base, "parallel.zero.reduce_bucket_size=100000",
                                          "parallel.zero.allgather_bucket_size=100000"]), 2, device="cuda")
    assert small.comm_buffers == pytest.approx(100_000 * 4 * (1 + 1 / 2))
    assert default.comm_buffers > small.comm_buffers
    assert (small.params, small.grads, small.optimizer) == (default.params, default.grads, default.optimizer)
