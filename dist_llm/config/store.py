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
}

_registered = False


def register_configs() -> None:
    """Idempotent: the CLI and the tests both call it."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=schema.JobConfig)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    _registered = True


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


def compose(overrides: list[str] | None = None, config_name: str = "config") -> schema.JobConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, outside ``@hydra.main`` (tests, submit)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=default_config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return to_job_config(cfg)


def job_config_to_dict(cfg: schema.JobConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


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

_prepare_registered = False


def register_prepare_configs() -> None:
    """Register ``prepare_schema`` and the ``<group>/<group>_schema`` nodes (idempotent).

    The group YAMLs live under ``conf/prepare/``, which :func:`prepare_searchpath_override` adds
    to Hydra's search path, so ``dist-llm prepare filter=gopher`` picks conf/prepare/filter/gopher.yaml
    while the training config never sees these groups.
    """
    global _prepare_registered
    if _prepare_registered:
        return
    from dist_llm.config import prepare_schema

    cs = ConfigStore.instance()
    cs.store(name="prepare_schema", node=prepare_schema.PrepareConfig)
    for group, cls in PREPARE_GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=getattr(prepare_schema, cls))
    _prepare_registered = True


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
    """Compose ``conf/prepare.yaml`` with overrides, outside ``@hydra.main`` (tests, bench)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_prepare_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=default_config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name="prepare",
                            overrides=[prepare_searchpath_override(), *list(overrides or [])])
    return to_prepare_config(cfg)


def prepare_config_to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
