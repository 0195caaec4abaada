"""Metric loggers: one small interface, several backends, one factory.

The trainer only ever talks to :class:`MetricLogger`, so switching between W&B, the console and
nothing is a config change (``logging.backend``), never a code change. This is the only module
in the project that imports wandb, and it does so lazily, so console-only runs never pay for it.

Every logging rank also writes ``<run_dir>/metrics.jsonl``: a plain, append-only record that
survives crashes and needs no service to read back.
"""
from __future__ import annotations

import abc
import json
import logging
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

from dist_llm.config.choices import LogBackend, LogMode
from dist_llm.config.schema import LoggingConfig
from dist_llm.observability.redact import REDACTED, is_secret_key, redact  # noqa: F401 - re-exported

log = logging.getLogger("dist_llm.metrics")

BACKENDS = LogBackend.values()
WANDB_MODES = LogMode.values()
RUN_ID_FILE = "wandb_run_id.txt"


class MetricLogger(abc.ABC):
    """Where scalar metrics go. Implementations must be cheap to call every step."""

    @abc.abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at optimizer step ``step``."""

    @abc.abstractmethod
    def log_summary(self, d: dict) -> None:
        """Record end-of-run values (best val loss, total tokens, ...)."""

    @abc.abstractmethod
    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; ``exit_code != 0`` marks the run as failed where the backend can."""


class NoneLogger(MetricLogger):
    """Drops everything; what non-logging ranks get so callers never branch on rank."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_summary(self, d: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def format_number(v: Any) -> str:
    """Short human form: integers as integers, tiny/huge values in e-notation, else 4 decimals."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a == 0.0:
        return "0"
    if a >= 1e6:
        return f"{v:.3e}"
    if v.is_integer():
        return str(int(v))
    if a < 1e-2:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}"


class ConsoleLogger(MetricLogger):
    """One plain line per call (``step 12 | loss 3.1234 | lr 1.2e-03``), grep- and log-file friendly."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    def log(self, metrics: dict[str, float], step: int) -> None:
        parts = [f"step {step}"] + [f"{k} {format_number(_plain(v))}" for k, v in metrics.items()]
        self._log.info(" | ".join(parts))

    def log_summary(self, d: dict) -> None:
        parts = [f"{k} {format_number(_plain(v))}" for k, v in d.items()]
        self._log.info("summary | %s", " | ".join(parts))

    def finish(self, exit_code: int = 0) -> None:
        pass


def _plain(v: Any) -> Any:
    """Turn 0-d tensors / numpy scalars into Python numbers so json and formatting work."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    item = getattr(v, "item", None)
    if callable(item):
        return item()
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


class JsonlLogger(MetricLogger):
    """Appends ``{"step": N, **metrics}`` per call and flushes it immediately.

    Flushing each line means a crash loses nothing already logged; append mode means a resumed
    job continues the same file. After a resume from an earlier checkpoint, a step may appear
    twice: readers should keep the last record per step. Summaries go to ``summary.json`` next
    to the file (merged across calls), so every line of the JSONL stays a per-step record.
    Non-finite values are written as ``NaN``/``Infinity`` (Python's json reads them back).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        rec = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def log_summary(self, d: dict) -> None:
        summary_path = self.path.with_name("summary.json")
        merged: dict[str, Any] = {}
        if summary_path.exists():
            try:
                merged = json.loads(summary_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                merged = {}
        merged.update({k: _plain(v) for k, v in d.items()})
        tmp = summary_path.with_name(summary_path.name + ".tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, summary_path)

    def finish(self, exit_code: int = 0) -> None:
        if not self._f.closed:
            self._f.close()


class MultiLogger(MetricLogger):
    """Fans out to several loggers; ``finish`` reaches all of them even if one fails."""

    def __init__(self, loggers: Iterable[MetricLogger]) -> None:
        self.loggers: list[MetricLogger] = list(loggers)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_summary(self, d: dict) -> None:
        for lg in self.loggers:
            lg.log_summary(d)

    def finish(self, exit_code: int = 0) -> None:
        first: BaseException | None = None
        for lg in self.loggers:
            try:
                lg.finish(exit_code)
            except Exception as e:  # noqa: BLE001 - finish the rest, then re-raise
                first = first or e
        if first is not None:
            raise first


# --------------------------------------------------------------------------- secrets


def scrub_secrets(d: Any) -> Any:
    """The run config as W&B may store it: :func:`dist_llm.observability.redact.redact`."""
    return redact(d)


# --------------------------------------------------------------------------- wandb


class WandbCredentialsError(RuntimeError):
    """Online W&B logging was requested but no API key is available."""


def resolve_wandb_mode(cfg_mode: str) -> str:
    """``WANDB_MODE`` from the environment wins (cluster admins set it), else ``logging.mode``."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        env = {"dryrun": "offline", "run": "online"}.get(env, env)
        if env not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env!r} is not one of {', '.join(WANDB_MODES)}")
        return env
    if cfg_mode not in WANDB_MODES:
        raise ValueError(f"logging.mode={cfg_mode!r} is not one of {', '.join(WANDB_MODES)}")
    return cfg_mode


def has_wandb_credentials() -> bool:
    """An API key in ``WANDB_API_KEY`` or a netrc entry for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return False
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _load_or_create_run_id(run_dir: Path) -> str:
    """One W&B run per job: the id is minted once and re-read by every restart of the job."""
    path = run_dir / RUN_ID_FILE
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return run_id


class WandbLogger(MetricLogger):
    """A W&B run living inside the run directory (``run_dir/wandb/offline-run-*`` when offline).

    Offline is the default so a job never blocks on the network or a missing key; sync later
    with ``wandb sync <run_dir>/wandb/offline-run-*``. Restarts resume the same run id.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: str, run_name: str, config_dict: dict) -> None:
        mode = resolve_wandb_mode(cfg.mode)
        if mode == "online" and not has_wandb_credentials():
            raise WandbCredentialsError(
                "W&B online mode (logging.mode=online or WANDB_MODE=online) needs an API key, but "
                "WANDB_API_KEY is unset and ~/.netrc has no entry for api.wandb.ai. Set "
                "WANDB_API_KEY=<key from https://wandb.ai/authorize> or run `wandb login`, or use "
                "logging.mode=offline and upload later with `wandb sync`."
            )
        import wandb  # lazy: only W&B runs pay for the import

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.run_id = _load_or_create_run_id(self.run_dir) if mode != "disabled" else None
        group = cfg.group or (config_dict or {}).get("experiment") or None
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            name=run_name,
            tags=list(cfg.tags) or None,
            config=scrub_secrets(dict(config_dict or {})),
            id=self.run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=mode,
            reinit="finish_previous",
        )
        self._finished = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=int(step))

    def log_summary(self, d: dict) -> None:
        self.run.summary.update({k: _plain(v) for k, v in d.items()})

    def finish(self, exit_code: int = 0) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)


# --------------------------------------------------------------------------- factory


def build_logger(
    cfg: LoggingConfig,
    run_dir: str,
    run_name: str,
    config_dict: dict,
    is_logging_rank: bool,
) -> MetricLogger:
    """The logger for this rank: JSONL + the configured backend on the logging rank, else nothing.

    ``logging.backend`` is validated on every rank, so a typo fails the whole job at once instead
    of only the logging rank while the others wait in a collective.
    """
    if cfg.backend not in BACKENDS:
        raise ValueError(f"logging.backend={cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.backend == "wandb":
        resolve_wandb_mode(cfg.mode)  # same reason: bad modes fail everywhere
    if not is_logging_rank:
        return NoneLogger()
    loggers: list[MetricLogger] = []
    if cfg.backend == "wandb":
        loggers.append(WandbLogger(cfg, run_dir, run_name, config_dict))
    if cfg.backend == "console" or (cfg.backend == "wandb" and cfg.console):
        loggers.append(ConsoleLogger())
    loggers.insert(0, JsonlLogger(Path(run_dir) / "metrics.jsonl"))
    return MultiLogger(loggers)
