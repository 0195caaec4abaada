"""Register the schemas in Hydra's ConfigStore and convert a composed config to typed objects.

Each group's YAML files start with a ``defaults: [<group>_schema, _self_]`` line (see conf/), so
Hydra merges them onto the dataclass schema: an unknown key or a wrong type is rejected while
composing, naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from dist_llm.config import schema

GROUP_SCHEMAS = {
    "model": schema.ModelConfig,
    "data": schema.DataConfig,
    "parallel": schema.ParallelConfig,
    "optim": schema.OptimConfig,
    "train": schema.TrainConfig,
    "logging": schema.LoggingConfig,
    "launcher": schema.LauncherConfig,
    "debug": schema.DebugConfig,
    "task": schema.TaskConfig,
}

_registered: set = set()


def _register(root_name: str, root_node: Any, groups: dict) -> None:
    """Store a primary schema and its ``<group>/<group>_schema`` nodes once per process."""
    if root_name in _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name=root_name, node=root_node)
    for group, node in groups.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    _registered.add(root_name)


def register_configs() -> None:
    """Idempotent: the CLI and the tests both call it."""
    _register("job_schema", schema.JobConfig, GROUP_SCHEMAS)


def default_config_dir() -> str:
    """``conf/`` at the repository root (the package is installed editable from it);
    ``DIST_LLM_CONF`` overrides, for installs that keep the configs elsewhere."""
    import os

    env = os.environ.get("DIST_LLM_CONF")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def to_job_config(cfg: Any) -> schema.JobConfig:
    """The one conversion from Hydra's DictConfig to typed objects."""
    if isinstance(cfg, schema.JobConfig):
        return cfg
    node = OmegaConf.merge(OmegaConf.structured(schema.JobConfig), cfg)
    if "hydra" in node:
        del node["hydra"]
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, schema.JobConfig)
    return obj


def _compose_raw(config_name: str, overrides: list[str]):
    """Hydra's compose API on ``conf/``, outside ``@hydra.main`` (tests, submit, bench)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=default_config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> schema.JobConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides into a typed :class:`JobConfig`."""
    register_configs()
    return to_job_config(_compose_raw(config_name, list(overrides or [])))


def config_to_dict(cfg: Any) -> dict:
    """A typed config (job or prepare) as plain containers: W&B, manifests, Ray workers.
    Choices (enums) become their plain string values."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True,  # type: ignore[return-value]
                                  enum_to_str=True)


def job_config_from_yaml(path: str) -> schema.JobConfig:
    """Load a resolved config written by :func:`save_job_config` (mock-cluster workers)."""
    return to_job_config(OmegaConf.load(path))


def save_job_config(cfg: schema.JobConfig, path: str) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), path)


PREPARE_GROUP_SCHEMAS = {
    "input": "PrepareInputConfig",
    "clean": "CleanConfig",
    "filter": "FilterConfig",
    "dedup": "DedupConfig",
    "tokenizer": "TokenizerPrepConfig",
    "pack": "PackConfig",
    "split": "SplitConfig",
}

def register_prepare_configs() -> None:
    """Register ``prepare_schema`` and its group schemas (idempotent).

    The group YAMLs live under ``conf/prepare/``, which :func:`prepare_searchpath_override` adds
    to Hydra's search path, so ``dist-llm prepare filter=gopher`` picks conf/prepare/filter/gopher.yaml
    while the training config never sees these groups.
    """
    from dist_llm.config import prepare_schema

    _register("prepare_schema", prepare_schema.PrepareConfig,
              {g: getattr(prepare_schema, cls) for g, cls in PREPARE_GROUP_SCHEMAS.items()})


def prepare_searchpath_override() -> str:
    """The Hydra override that makes conf/prepare/ a config group root (see above)."""
    return f"hydra.searchpath=[file://{Path(default_config_dir()) / 'prepare'}]"


def to_prepare_config(cfg: Any):
    """Hydra's DictConfig (or an already typed object) to a ``PrepareConfig``."""
    from dist_llm.config.prepare_schema import PrepareConfig

    if isinstance(cfg, PrepareConfig):
        return cfg
    node = OmegaConf.merge(OmegaConf.structured(PrepareConfig), cfg)
    if "hydra" in node:
        del node["hydra"]
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, PrepareConfig)
    return obj


def compose_prepare(overrides: list[str] | None = None):
    """Compose ``conf/prepare.yaml`` with overrides into a typed ``PrepareConfig``."""
    register_prepare_configs()
    return to_prepare_config(_compose_raw("prepare", [prepare_searchpath_override(), *list(overrides or [])]))
