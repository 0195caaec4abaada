"""One redaction for every sink: patterns, environment values, the log filter, config.yaml and
rendered sbatch scripts (in process; the end-to-end check is tests/test_secrets_e2e.py)."""
from __future__ import annotations

import io
import logging
import stat

import pytest

from dist_llm.config.store import compose, job_config_from_yaml
from dist_llm.observability.redact import REDACTED, RedactFilter, redact, redact_text, save_config_redacted

SENTINEL = "SENTINELVALUE123"


@pytest.mark.parametrize("text, secret", [
    ("export HF_TOKEN=abc123def", "abc123def"),
    ("export WANDB_API_KEY='q1w2e3r4'; echo ok", "q1w2e3r4"),
    ("--container-env=AWS_SECRET_ACCESS_KEY=zxcvbnm12345", "zxcvbnm12345"),
    ("huggingface-cli login --token zzzzyyyy", "zzzzyyyy"),
    ('{"api_key": "mykey99"}', "mykey99"),
    ("Authorization: Bearer eyJhbGciOi.xyz", "eyJhbGciOi.xyz"),
    ("git clone https://x/ hf_abcdefghijklmnopqrstuvwxyz12", "hf_abcdefghijklmnopqrstuvwxyz12"),
    ("aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("key " + "ab" * 20, "ab" * 20),
    ("client_secret: s3cr3tvalue", "s3cr3tvalue"),
])
def test_secret_shapes_are_redacted(text, secret):
    out = redact_text(text)
    assert secret not in out and REDACTED in out, out


@pytest.mark.parametrize("text", [
    "train.sample.tokens=16 data.tokenizer=byte train.checkpoint.keep_last=2",
    "module load cuda/12.1 && source venv/bin/activate",
    "step 20 loss 3.1416 tokens_per_s=1234",
])
def test_ordinary_text_is_left_alone(text):
    assert redact_text(text) == text


def test_secret_env_values_are_redacted_anywhere(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    monkeypatch.setenv("SOME_FLAG", "1")
    assert SENTINEL not in redact_text(f"echo {SENTINEL}xyz")
    assert redact({"a": [f"x{SENTINEL}"], "n": 1}) == {"a": [f"x{REDACTED}"], "n": 1}
    assert redact_text("use 1 gpu") == "use 1 gpu"  # short non-secret values are not chased


def test_log_filter_redacts_messages_and_arguments(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactFilter())
    lg = logging.getLogger("dist_llm.test_redact")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    try:
        lg.info("setup line %s", f"export HF_TOKEN={SENTINEL}")
        lg.info("value %s", SENTINEL)
    finally:
        lg.removeHandler(handler)
    assert SENTINEL not in buf.getvalue() and buf.getvalue().count(REDACTED) == 2


def test_config_yaml_is_redacted_private_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    cfg = compose(["launcher=slurm", f"launcher.slurm.setup=['export HF_TOKEN={SENTINEL}','module load cuda']"])
    path = tmp_path / "config.yaml"
    save_config_redacted(cfg, path)
    assert SENTINEL not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = job_config_from_yaml(str(path))
    assert back.launcher.slurm.setup == [f"export HF_TOKEN={REDACTED}", "module load cuda"]
    assert back.model == cfg.model and back.train == cfg.train


def test_rendered_sbatch_is_redacted(monkeypatch):
    from dist_llm.submit.slurm import submit_slurm

    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    overrides = [f"launcher.slurm.setup=['export HF_TOKEN={SENTINEL}']", "launcher.slurm.srun_args=['--container-env=HF_TOKEN=abc12345xyz']"]
    cfg = compose(["launcher=slurm", *overrides])
    out = io.StringIO()
    script = submit_slurm(cfg, overrides, dry_run=True, stdout=out)
    assert SENTINEL not in script and SENTINEL not in out.getvalue() and "abc12345xyz" not in script
    assert "export HF_TOKEN=" in script
