"""Typed configuration schemas, one dataclass per Hydra config group.

Every group under ``conf/`` is backed by one of these dataclasses (registered in Hydra's
ConfigStore by :mod:`dist_llm.config.store`), so a typo'd key or a value of the wrong type is
rejected at composition time. The Hydra config is converted once with ``OmegaConf.to_object``
into a :class:`JobConfig`; code below the CLI only ever sees these typed objects.

This module imports nothing of ours (see shared/notes/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelConfig:
    """A GPT decoder. ``preset`` picks the block flavour; sizes are free."""

    preset: str = "gpt2"  # gpt2 (LayerNorm, learned positions, GELU) | llama (RMSNorm, RoPE, SwiGLU)
    n_layers: int = 2
    n_heads: int = 4
    # Key/value heads (grouped-query attention); None = n_heads (plain multi-head). Must divide n_heads.
    n_kv_heads: Optional[int] = None
    d_model: int = 64
    # MLP width; None = 4*d_model for gpt2, int(8*d_model/3) rounded up to a multiple of 16 for llama
    d_ff: Optional[int] = None
    max_seq_len: int = 64
    vocab_size: int = 256
    dropout: float = 0.0
    bias: Optional[bool] = None  # None = preset default (gpt2: True, llama: False)
    tie_embeddings: Optional[bool] = None  # None = preset default (gpt2: True, llama: False)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # Start from these weights: a Hugging Face save_pretrained dir (config.json + safetensors) or one
    # of our checkpoints (step-N/, best/, run dir). Architecture fields come from it (see
    # docs/model-path.md); use model=pretrained so no preset sizes conflict with it.
    init_from: Optional[str] = None
    # Per-head width; None = d_model // n_heads. Set by structured head pruning (dist-llm prune), which
    # removes heads but keeps d_model, so the attention width n_heads*head_dim becomes < d_model.
    head_dim: Optional[int] = None


@dataclass
class DatasetSource:
    """One pre-tokenized shard directory (with a ``manifest.json``) and its blend weight."""

    path: str = "???"
    weight: float = 1.0


@dataclass
class DataConfig:
    # Weighted blend of training sources. Each path is a directory written by the shard writer
    # (``manifest.json`` + ``*.tar``); relative paths are taken from the working directory.
    train: List[DatasetSource] = field(default_factory=list)
    # Validation source (same format). None or "" = no validation.
    val: Optional[str] = None
    # Independent shard streams. The global batch is cut lane-major from these, so the batches a
    # run sees do not depend on the data-parallel size: lanes % (dp * num_workers) == 0 and
    # global_batch_size % lanes == 0 are checked by validate().
    lanes: int = 2
    num_workers: int = 0
    seed: int = 1234
    # When set, ``dist-llm train`` builds the embedded default corpus (stdlib sources) here
    # first if no manifest exists yet (the demo path; no download).
    build_embedded: bool = False
    embedded_dir: str = "data/stdlib"
    embedded_max_bytes: int = 3_000_000  # how much stdlib source text the embedded corpus takes


@dataclass
class ParallelConfig:
    engine: str = "deepspeed"  # deepspeed | megatron (next issue)
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    sp: bool = False
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    device: str = "auto"  # auto | cpu | cuda
    timeout_s: int = 600  # collective timeout: a dead peer fails the job instead of hanging it


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    decay: str = "cosine"  # cosine | linear | constant
    decay_steps: Optional[int] = None  # None = train.max_steps - warmup_steps
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainConfig:
    max_steps: int = 20
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_len: int = 32
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # 0 = never
    eval_batches: int = 4
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    keep_best: bool = True
    resume: str = "auto"  # auto | never | <path to a step-N checkpoint or a run directory>
    save_at_end: bool = True
    sample_tokens: int = 0  # >0: generate a sample of this many tokens at the end
    sample_prompt: str = "def "
    peak_flops: float = 0.0  # per device, for MFU; 0 = measure a matmul on CPU / table on GPU
    progress_bar: str = "auto"  # auto (tty only) | on | off
    # Test hook: os._exit(code) on this rank after this step (fault-injection tests).
    crash_at_step: int = -1
    crash_rank: int = 0
    crash_during_save: bool = False


@dataclass
class LoggingConfig:
    backend: str = "console"  # wandb | console | none
    project: str = "dist-llm"
    entity: Optional[str] = None
    group: Optional[str] = None  # None = experiment name
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE wins when set)
    tags: List[str] = field(default_factory=list)
    console: bool = True  # with backend=wandb, also print metric lines on the logging rank


@dataclass
class LauncherConfig:
    kind: str = "local"  # local (mock cluster) | torchrun | slurm | ray | none (already a rank)
    nproc: int = 1  # ranks of the local mock cluster
    nodes: int = 1
    tasks_per_node: int = 1
    master_port: int = 0  # 0 = derived (job id for Slurm, a free port for local)
    # Slurm rendering (dist-llm submit slurm)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "01:00:00"
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    constraint: Optional[str] = None
    exclusive: bool = False
    requeue: bool = True
    signal_seconds: int = 90
    max_requeues: int = 3
    extra_sbatch: List[str] = field(default_factory=list)
    setup: List[str] = field(default_factory=list)
    # extra srun arguments, e.g. a site's container options: --container-image=..., --mpi=pmix
    srun_args: List[str] = field(default_factory=list)
    # Ray
    address: Optional[str] = None
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    max_failures: int = 2


@dataclass
class JobConfig:
    """The whole job. ``experiment`` presets only override fields of these groups."""

    name: str = "dev"  # run name; the run directory is <output_dir>/<name>[-<job id>]
    experiment: str = "default"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
