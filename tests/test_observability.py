"""Tests for dist_llm.observability: loggers (incl. one real offline W&B run), metrics, progress."""
from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from dist_llm.config.schema import LoggingConfig
from dist_llm.observability import (
    ConsoleLogger,
    JsonlLogger,
    MultiLogger,
    NoneLogger,
    NullProgress,
    Throughput,
    WandbCredentialsError,
    WandbLogger,
    build_logger,
    format_number,
    gpu_peak_flops,
    make_progress,
    measure_cpu_peak_flops,
    memory_stats,
    mfu,
    resolve_wandb_mode,
    scrub_secrets,
)
from dist_llm.observability.loggers import REDACTED, RUN_ID_FILE

HEX_KEY = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B API key
PLANTED = "planted-s3cr3t-Zq81"
NORMAL = "normal-value-4471"


def _isolate_wandb_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No real credentials, settings or caches: HOME in tmp, no key, no netrc."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_RUN_ID",
                "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_NAME"):
        mp.delenv(var, raising=False)
    mp.setenv("HOME", str(home))
    mp.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    mp.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    mp.setenv("WANDB_DATA_DIR", str(home / ".local" / "wandb"))
    mp.setenv("WANDB_SILENT", "true")


# ----------------------------------------------------------------------------- JSONL / console


def test_jsonl_appends_parseable_lines_and_reopens_in_append_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.jsonl"
    lg = JsonlLogger(path)
    lg.log({"loss": 3.5, "lr": 1e-3}, step=1)
    # flushed per line: readable before finish (a crash would not lose it)
    assert json.loads(path.read_text().splitlines()[0]) == {"step": 1, "loss": 3.5, "lr": 1e-3}
    lg.log({"loss": 3.0}, step=2)
    lg.finish()
    lg2 = JsonlLogger(path)  # a resumed job
    lg2.log({"loss": 2.5}, step=3)
    lg2.log_summary({"best_loss": 2.5})
    lg2.finish()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[2]["loss"] == 2.5
    assert json.loads((tmp_path / "sub" / "summary.json").read_text()) == {"best_loss": 2.5}


def test_console_line_format(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dist_llm.metrics"):
        ConsoleLogger().log({"loss": 3.12341, "lr": 1.2e-3, "tokens": 4096.0, "tok_s": 1234.56}, step=12)
    assert caplog.records[-1].getMessage() == "step 12 | loss 3.1234 | lr 1.2e-03 | tokens 4096 | tok_s 1234.6"
    assert format_number(2.5e9) == "2.500e+09"
    assert format_number(0.0) == "0"
    assert format_number(float("nan")) == "nan"


def test_multilogger_finishes_all_even_if_one_fails(tmp_path: Path) -> None:
    class Boom(NoneLogger):
        def finish(self, exit_code: int = 0) -> None:
            raise RuntimeError("boom")

    j = JsonlLogger(tmp_path / "m.jsonl")
    with pytest.raises(RuntimeError, match="boom"):
        MultiLogger([Boom(), j]).finish(1)
    assert j._f.closed


# ----------------------------------------------------------------------------- secrets


def test_scrub_secrets_nested() -> None:
    d = {
        "api_key": "abc",
        "optim": {"lr": 3e-3, "hf_token": "hf_xyz", "DB_PASSWORD": "pw"},
        "clients": [{"clientSecret": "s"}, {"name": "ok"}],
        "launcher": {"setup": ["module load cuda", f"export WANDB_API_KEY={HEX_KEY}"]},
        "plain_hex": HEX_KEY,
        "train": {"sample_tokens": 16, "keep_last": 2, "tokenizer": "byte"},
        "auth": {"accessToken": "t", "apiKey": "k"},
        "maybe_key": None,
    }
    out = scrub_secrets(d)
    assert out["api_key"] == REDACTED
    assert out["optim"] == {"lr": 3e-3, "hf_token": REDACTED, "DB_PASSWORD": REDACTED}
    assert out["clients"] == [{"clientSecret": REDACTED}, {"name": "ok"}]
    assert out["launcher"]["setup"] == ["module load cuda", f"export WANDB_API_KEY={REDACTED}"]
    assert out["plain_hex"] == REDACTED
    # ordinary fields that merely contain "token"/"key" stay readable
    assert out["train"] == {"sample_tokens": 16, "keep_last": 2, "tokenizer": "byte"}
    assert out["auth"] == {"accessToken": REDACTED, "apiKey": REDACTED}
    assert out["maybe_key"] is None
    assert d["api_key"] == "abc"  # input untouched


# ----------------------------------------------------------------------------- real offline W&B


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real offline W&B run (plus one resume) shared by the W&B assertions: init is slow."""
    base = tmp_path_factory.mktemp("wandb")
    run_dir = base / "run"
    config = {
        "experiment": "exp-obs",
        "model": {"d_model": 64, "marker": NORMAL},
        "logging": {"wandb_api_key": PLANTED},
        "launcher": {"setup": [f"export WANDB_API_KEY={HEX_KEY}"]},
        "secrets": [{"password": PLANTED}],
    }
    cfg = LoggingConfig(backend="wandb", project="dist-llm-test", tags=["unit"])
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb_env(mp, base / "home")
        mp.setenv("WANDB_MODE", "offline")
        lg = build_logger(cfg, str(run_dir), "obs-run", config, is_logging_rank=True)
        assert isinstance(lg, MultiLogger)
        w = next(x for x in lg.loggers if isinstance(x, WandbLogger))
        first = {"id": w.run.id, "group": w.run.group, "name": w.run.name, "mode": w.mode}
        for step in (1, 2, 3):
            lg.log({"loss": 4.0 - step, "lr": 1e-3}, step=step)
        lg.log_summary({"best_loss": 1.0})
        lg.finish(0)
        lg2 = build_logger(cfg, str(run_dir), "obs-run", config, is_logging_rank=True)
        w2 = next(x for x in lg2.loggers if isinstance(x, WandbLogger))
        second_id = w2.run.id
        lg2.log({"loss": 0.5}, step=4)
        lg2.finish(0)
    return {"run_dir": run_dir, "first": first, "second_id": second_id}


def test_wandb_offline_run_lands_in_run_dir(wandb_run: dict) -> None:
    run_dir: Path = wandb_run["run_dir"]
    first = wandb_run["first"]
    assert first["mode"] == "offline"
    assert first["group"] == "exp-obs" and first["name"] == "obs-run"
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{first['id']}"))
    assert offline, list((run_dir / "wandb").iterdir())
    assert list(offline[0].glob("*.wandb"))
    assert (run_dir / RUN_ID_FILE).read_text().strip() == first["id"]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_wandb_config_is_scrubbed(wandb_run: dict) -> None:
    files = [p for p in (wandb_run["run_dir"] / "wandb").rglob("*") if p.is_file()]
    blobs = [p.read_bytes() for p in files]
    for secret in (PLANTED, HEX_KEY):
        leaks = [str(p) for p, b in zip(files, blobs) if secret.encode() in b]
        assert not leaks, f"{secret} leaked into {leaks}"
    assert any(NORMAL.encode() in b for b in blobs), "normal config value not recorded"


def test_wandb_restart_reuses_run_id(wandb_run: dict) -> None:
    assert wandb_run["second_id"] == wandb_run["first"]["id"]


def test_wandb_online_without_key_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_wandb_env(monkeypatch, tmp_path / "home")
    cfg = LoggingConfig(backend="wandb", mode="online")
    with pytest.raises(WandbCredentialsError, match=r"WANDB_API_KEY.*logging\.mode=offline"):
        build_logger(cfg, str(tmp_path / "run"), "r", {}, is_logging_rank=True)
    monkeypatch.setenv("WANDB_MODE", "online")  # env wins over an offline config, same error
    with pytest.raises(WandbCredentialsError):
        build_logger(LoggingConfig(backend="wandb"), str(tmp_path / "run"), "r", {}, is_logging_rank=True)
    assert not (tmp_path / "run" / "wandb").exists()


def test_wandb_mode_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    with pytest.raises(ValueError, match="logging.mode"):
        resolve_wandb_mode("sometimes")


# ----------------------------------------------------------------------------- factory


def test_unknown_backend_raises_on_every_rank(tmp_path: Path) -> None:
    for rank0 in (True, False):
        with pytest.raises(ValueError, match=r"logging\.backend.*wandb, console, none"):
            build_logger(LoggingConfig(backend="tensorboard"), str(tmp_path), "r", {}, rank0)


def test_non_logging_rank_gets_none_logger(tmp_path: Path) -> None:
    lg = build_logger(LoggingConfig(backend="console"), str(tmp_path), "r", {}, is_logging_rank=False)
    assert isinstance(lg, NoneLogger)
    lg.log({"loss": 1.0}, 1)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_console_backend_also_writes_jsonl(tmp_path: Path) -> None:
    lg = build_logger(LoggingConfig(backend="console"), str(tmp_path), "r", {}, is_logging_rank=True)
    assert [type(x) for x in lg.loggers] == [JsonlLogger, ConsoleLogger]
    lg.log({"loss": 1.0}, 7)
    lg.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 7, "loss": 1.0}


# ----------------------------------------------------------------------------- metrics


def test_mfu_arithmetic() -> None:
    # 1000 tok/s * 6e9 FLOP/tok = 6e12 FLOP/s over 2 devices of 1e13 -> 0.3
    assert mfu(1000.0, 6e9, 2, 1e13) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        mfu(1000.0, 6e9, 2, 0.0)


def test_gpu_peak_table() -> None:
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H200", "bfloat16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156e12)
    assert gpu_peak_flops("NVIDIA A10", "bf16") == pytest.approx(125e12)
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert gpu_peak_flops("NVIDIA H100", "int3") is None


def test_cpu_peak_and_memory() -> None:
    assert measure_cpu_peak_flops(n=64, repeats=3) > 1e6
    m = memory_stats("cpu")
    assert set(m) == {"mem/rss_gb"} and 0 < m["mem/rss_gb"] < 1024


def test_throughput_excludes_warmup_and_windows() -> None:
    tp = Throughput(window=2, warmup=1)
    first = tp.update(10.0, 100, 1)  # slow warmup step: reported on its own, then dropped
    assert first["tokens_per_s"] == pytest.approx(10.0)
    tp.update(1.0, 100, 2)
    out = tp.update(3.0, 300, 4)
    assert out == pytest.approx({"tokens_per_s": 100.0, "samples_per_s": 1.5, "step_time_s": 2.0})
    out = tp.update(1.0, 50, 1)  # window of 2 drops the (1.0, 100) step
    assert out["tokens_per_s"] == pytest.approx(350 / 4.0)


# ----------------------------------------------------------------------------- progress


def test_progress_noop_when_not_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = make_progress(10, 2, "auto")
    assert isinstance(bar, NullProgress)
    bar.update(1)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert isinstance(make_progress(10, 0, "off"), NullProgress)
    on = make_progress(10, 3, "on")
    assert on.n == 3 and not isinstance(on, NullProgress)
    on.close()
    with pytest.raises(ValueError, match="train.ui.progress_bar"):
        make_progress(10, 0, "maybe")
