"""One redaction for every sink that could leak a credential: the W&B config, ``config.yaml`` in
the run directory, checkpoint manifests, rendered sbatch scripts and our log lines.

What counts as a secret:

* the value of any key whose name looks secret (``api_key``, ``hf_token``, ``clientSecret``,
  ``DB_PASSWORD``; see :func:`is_secret_key`), wherever it sits in a nested config;
* inside any string (``launcher.setup`` lines, ``srun_args``, overrides, log messages):
  ``NAME=value`` / ``NAME: value`` / ``--name value`` where NAME looks secret
  (``export HF_TOKEN=...``, ``--container-env=WANDB_API_KEY=...``, ``--token abc``);
  40-hex strings (W&B keys; git SHAs too, which W&B records itself); Hugging Face ``hf_...``
  tokens; AWS access key ids (``AKIA...``/``ASIA...``); ``Bearer ...`` tokens;
* the literal value of every secret-named environment variable of this process (so the real
  ``WANDB_API_KEY`` is caught wherever it was pasted, whatever surrounds it).

This module imports nothing of ours, so any layer (submit, checkpoint, train) may call it.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Mapping

REDACTED = "***REDACTED***"

_SECRET_SUBSTRINGS = ("secret", "password", "passwd", "credential")
_WORD_SPLIT = re.compile(r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])")
_MIN_ENV_SECRET = 6  # shorter env values ("1", "true") would redact ordinary text

_HEX40 = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{40}(?![0-9a-fA-F])")
_TOKEN_FORMATS = (
    re.compile(r"\bhf_[A-Za-z0-9]{16,}"),  # Hugging Face user access tokens
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,})"),  # GitHub, Slack
)
_BEARER = re.compile(r"(?i)\b(bearer|token|basic)(\s+)([A-Za-z0-9\-._~+/]{8,}=*)")
# NAME=value, NAME: value, "NAME": "value" (value up to whitespace, quote, ; & | , } ]).
_ASSIGN = re.compile(r"""(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P<sep>["']?\s*[:=]\s*["']?)(?P<val>[^\s"',;&|}\]]+)""")
# --name value / -name value (command lines, srun_args).
_FLAG = re.compile(r"(?P<name>--?[A-Za-z][A-Za-z0-9_-]*)(?P<sep>\s+)(?P<val>[^\s-][^\s]*)")


@functools.lru_cache(maxsize=4096)  # names repeat (env vars, metric keys): redaction runs per log line
def is_secret_key(name: str) -> bool:
    """True for names like api_key, apiKey, hf_token, accessToken, db_password, client_secret.

    Matching is per word part (split on ``_ - .`` and camelCase), not a raw substring, so ordinary
    training fields that merely contain "token"/"key"/"api" (``sample_tokens``, ``tokenizer``,
    ``tokens_per_s``, ``keep_last``, ``rapid``) stay readable.
    """
    for part in (p.lower() for p in _WORD_SPLIT.split(str(name)) if p):
        if any(s in part for s in _SECRET_SUBSTRINGS):
            return True
        if part.startswith("api") or part.endswith(("key", "keys", "token")):
            return True
    return False


def _env_secrets() -> list[str]:
    vals = {v for k, v in os.environ.items() if is_secret_key(k) and len(v.strip()) >= _MIN_ENV_SECRET}
    return sorted(vals, key=len, reverse=True)  # longest first: a value containing another


def _redact_assignments(text: str) -> str:
    """``NAME=value`` pairs, also nested (``--container-env=HF_TOKEN=...``)."""
    def one(m: "re.Match[str]") -> str:
        name, sep, val = m.group("name"), m.group("sep"), m.group("val")
        if is_secret_key(name):
            return name + sep + REDACTED if val != REDACTED else m.group(0)
        return name + sep + (_redact_assignments(val) if "=" in val or ":" in val else val)
    return _ASSIGN.sub(one, text)


def redact_text(text: str) -> str:
    """``text`` with every secret-looking substring replaced by ``***REDACTED***``."""
    if not text:
        return text
    for value in _env_secrets():
        text = text.replace(value, REDACTED)
    text = _redact_assignments(text)
    text = _FLAG.sub(lambda m: m.group("name") + m.group("sep") + REDACTED
                     if is_secret_key(m.group("name")) and m.group("val") != REDACTED else m.group(0), text)
    text = _BEARER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    for pat in _TOKEN_FORMATS:
        text = pat.sub(REDACTED, text)
    return _HEX40.sub(REDACTED, text)


def redact(obj: Any) -> Any:
    """A deep copy of ``obj`` (dicts, lists, tuples, strings) with secrets replaced.

    Values of secret-named keys are replaced whole (unless None); every string is passed through
    :func:`redact_text`. Other values are returned unchanged; the input is never modified.
    """
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_key(str(k)) and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [redact(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactFilter(logging.Filter):
    """Rewrites each record's message with :func:`redact_text` (formatted first, so secrets passed
    as ``%s`` arguments are caught too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's problem, not ours
            return True
        record.msg, record.args = redact_text(msg), None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactFilter` to every handler of ``logger`` (default: the root logger, where
    ``logging.basicConfig`` puts ours). Handler filters see records from every child logger;
    logger filters would not. Idempotent."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def save_config_redacted(cfg: Any, path: "os.PathLike[str] | str") -> None:
    """Write a job config as YAML with secrets redacted, mode 0600 (``config.yaml`` in a run
    directory: readable back by ``job_config_from_yaml``; a credential never needs to be in it,
    the ranks read theirs from the environment)."""
    from omegaconf import OmegaConf

    from dist_llm.config.store import config_to_dict
    from dist_llm.fileio import write_private

    write_private(path, OmegaConf.to_yaml(OmegaConf.create(redact(config_to_dict(cfg)))))
