"""Typed configuration schemas, one dataclass per Hydra config group.

Every group under ``conf/`` is backed by one of these dataclasses (registered in Hydra's
ConfigStore by :mod:`dist_llm.config.store`), so a typo'd key or a value of the wrong type is
rejected at composition time. The Hydra config is converted once with ``OmegaConf.to_object``
into a :class:`JobConfig`; code below the CLI only ever sees these typed objects.

Choices are the enums of :mod:`dist_llm.config.choices`. This module imports nothing of ours
outside ``config/`` (see shared/notes/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dist_llm.config.choices import (BadSamples, Backend, CrashPoint, Decay, Device, EmbeddedData, EncoderArch,
                                     EngineKind, LauncherKind, LogBackend, LogMode, NanTarget, NumericsPolicy,
                                     OptimizerName, Precision, Preset, ProgressBar, TaskKind, TeacherDtype,
                                     WindowOffsets)


@dataclass
class ModelConfig:
    """A GPT decoder. ``preset`` picks the block flavour; sizes are free."""

    preset: Preset = Preset.gpt2
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
    # Encoder-only fields (preset bert/vit; mapped by dist_llm.models.encoder_config)
    type_vocab_size: int = 2  # bert: token-type (segment) embeddings
    image_size: int = 8  # vit: square images
    patch_size: int = 2  # vit: square patches; must divide image_size
    num_channels: int = 1  # vit
    num_classes: int = 10  # vit classifier width


@dataclass
class DatasetSource:
    """One pre-tokenized shard directory (with a ``manifest.json``), or its file://, http(s):// or
    pipe: URL (docs/data-sources.md), and its blend weight."""

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
    # Which embedded set build_embedded writes: stdlib (byte tokens, causal) | stdlib_bert
    # (char tokens, BERT pairs of train.seq_len) | digits (8x8 images for task=classify)
    embedded: EmbeddedData = EmbeddedData.stdlib
    # Refuse a data manifest whose shards lack a sha256 (false: accept unchecked shards).
    require_checksums: bool = True
    # A sample that does not match its manifest (missing member, wrong shape, duplicated key,
    # truncated shard): raise (stop, naming shard and key) | skip (count it, use the shard's
    # next good sample; abort when the bad share of samples read exceeds max_bad_fraction).
    bad_samples: BadSamples = BadSamples['raise']
    max_bad_fraction: float = 0.01
    # Sources named by URL instead of a directory (train[*].path, val): file:///dir,
    # http(s)://host/dir or pipe:<command printing {name}> (docs/data-sources.md). Verified
    # remote shards are kept in cache_dir (by sha256; None = fetched into memory when read);
    # a failed or corrupt fetch is tried again `retries` times after retry_backoff_s * 2^i s;
    # one fetch taking longer than fetch_timeout_s (0 = no limit) counts as failed.
    cache_dir: Optional[str] = None
    retries: int = 3
    retry_backoff_s: float = 1.0
    fetch_timeout_s: float = 600.0
    # Causal token data (task=pretrain/distill): per_epoch shifts every stored window by an offset
    # in [0, seq_len] drawn from (data.seed, epoch, source), so each epoch over a small corpus
    # sees new token boundaries (epoch 0 reads the windows as stored) | fixed (every epoch reads
    # the stored windows). Record packs (bert, image, classify, sft) read samples whole either way.
    window_offsets: WindowOffsets = WindowOffsets.per_epoch


@dataclass
class ZeroBuffersConfig:
    """DeepSpeed ZeRO's communication buffers and ZeRO-3 gather limits, in elements (not bytes).
    Defaults are DeepSpeed's, except the persistence threshold (0: every ZeRO-3 parameter is
    partitioned; DeepSpeed's 1e5 keeps small ones whole on every rank). Smaller values bound the
    transient memory these buffers add on top of the model states (docs/parallelism.md)."""

    reduce_bucket_size: int = 500_000_000  # ZeRO-1/2/3 gradient reduce bucket (ZeRO-0: DeepSpeed's fixed 5e8)
    allgather_bucket_size: int = 500_000_000  # ZeRO-1/2 parameter all-gather after the step
    prefetch_bucket_size: int = 50_000_000  # ZeRO-3: parameters gathered ahead of use
    param_persistence_threshold: int = 0  # ZeRO-3: parameters this small stay whole on every rank
    max_live_parameters: int = 1_000_000_000  # ZeRO-3: gathered parameters alive at once
    max_reuse_distance: int = 1_000_000_000  # ZeRO-3: keep a gathered parameter if reused this soon


@dataclass
class ParallelConfig:
    engine: EngineKind = EngineKind.deepspeed  # deepspeed (ZeRO, data parallel) | megatron (tp/pp/sp)
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    sp: bool = False
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Precision = Precision.fp32
    backend: Backend = Backend.auto
    device: Device = Device.auto
    timeout_s: int = 600  # collective timeout: a dead peer fails the job instead of hanging it
    # Collective timeout until the first step has finished (start-up, first compile/allocation,
    # checkpoint load); then parallel.timeout_s applies. Gloo and NCCL both honour it.
    first_step_timeout_s: int = 1800
    zero: ZeroBuffersConfig = field(default_factory=ZeroBuffersConfig)  # ZeRO buffer sizes (elements)


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    decay: Decay = Decay.cosine
    decay_steps: Optional[int] = None  # None = train.max_steps - warmup_steps
    grad_clip: float = 1.0  # 0 disables


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps; 0 = only at the end
    keep_last: int = 2
    keep_best: bool = True
    resume: str = "auto"  # auto | never | <path to a step-N checkpoint or a run directory>
    save_at_end: bool = True
    # A damaged checkpoint (garbage latest, bad sha256, missing file): false = stop naming the file;
    # true = resume from the newest older committed checkpoint that verifies (logged).
    resume_fallback: bool = False


@dataclass
class SampleConfig:
    tokens: int = 0  # >0: generate a sample of this many tokens at the end
    prompt: str = "def "


@dataclass
class UIConfig:
    progress_bar: ProgressBar = ProgressBar.auto
    peak_flops: float = 0.0  # per device, for MFU; 0 = measure a matmul on CPU / table on GPU
    # Exact per-phase times (time/fwd_bwd_s, time/optim_s, ...) on GPU: synchronizes the device at
    # each phase boundary, so it slows the step a little. Off: host-side times (exact on CPU).
    breakdown: bool = False


@dataclass
class SpikeConfig:
    """Loss-spike detector: a step whose global loss exceeds ``factor`` x the median of the last
    ``window`` applied steps' losses has its update withheld, then ``policy`` as for non-finite."""

    factor: float = 0.0  # 0 = off
    window: int = 20
    policy: NumericsPolicy = NumericsPolicy['raise']


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    # Hang watchdog: no heartbeat (phase of the step, step end) for this long after the first step
    # (before it: parallel.first_step_timeout_s) -> stack dump of all threads, exit non-zero. 0 = off.
    hang_timeout_s: int = 1800
    # Non-finite loss or gradients: the update is never applied; raise = stop | skip = go on, counted.
    nonfinite: NumericsPolicy = NumericsPolicy['raise']
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # "<start>:<steps>": a torch.profiler trace of steps start+1 .. start+steps (chrome trace JSON
    # in <run_dir>/profile/) on the ranks in profile_ranks; "" = off.
    profile: str = ""
    profile_ranks: List[int] = field(default_factory=lambda: [0])


@dataclass
class LoggingConfig:
    backend: LogBackend = LogBackend.console
    project: str = "dist-llm"
    entity: Optional[str] = None
    group: Optional[str] = None  # None = experiment name
    mode: LogMode = LogMode.offline  # WANDB_MODE wins when set
    tags: List[str] = field(default_factory=list)
    console: bool = True  # with backend=wandb, also print metric lines on the logging rank


@dataclass
class SlurmConfig:
    """``dist-llm submit slurm`` renders the sbatch script from these fields."""

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


@dataclass
class RayConfig:
    address: Optional[str] = None
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    max_failures: int = 2


@dataclass
class LauncherConfig:
    kind: LauncherKind = LauncherKind.local
    nproc: int = 1  # ranks of the local mock cluster
    nodes: int = 1
    tasks_per_node: int = 1
    master_port: int = 0  # 0 = derived (job id for Slurm, a free port for local)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class DebugConfig:
    """Fault injection for tests (conf/debug/). Off unless ``crash_at_step >= 0``; it fires once
    per run directory (a marker file), so the restarted job trains through."""

    crash_at_step: int = -1
    crash_rank: int = 0
    crash_point: CrashPoint = CrashPoint.after_step
    # Faults inside a step (every time the step is reached, not once per run directory), on
    # fault_rank (-1 = every rank):
    fault_rank: int = 1
    sleep_at_step: int = -1  # sleep sleep_s before the step's first `collective` phase
    sleep_s: float = 0.0
    collective: str = "all_reduce"  # phase name prefix the sleep waits in front of
    nan_at_step: int = -1  # a non-finite value at this step ...
    nan_in: NanTarget = NanTarget.loss  # ... in the loss or in one gradient
    inf: bool = False  # +inf instead of NaN
    spike_at_step: int = -1  # multiply the loss of this step by spike_factor
    spike_factor: float = 100.0

    @property
    def enabled(self) -> bool:
        return self.crash_at_step >= 0 or self.step_faults

    @property
    def step_faults(self) -> bool:
        return max(self.sleep_at_step, self.nan_at_step, self.spike_at_step) >= 0


@dataclass
class MlmNspTaskConfig:
    mlm_prob: float = 0.15  # share of non-special tokens chosen for masked-LM (80/10/10)
    mask_seed: int = 0  # masking is a function of (mask_seed, step, global sample index)


@dataclass
class ClassifyTaskConfig:
    augment: bool = False  # images: random shift by up to max_shift pixels (drawn per sample)
    max_shift: int = 1


@dataclass
class LoraConfig:
    """LoRA adapters (dist_llm/models/lora.py); rank 0 = off."""

    rank: int = 0
    alpha: float = 16.0  # update scale = alpha / rank
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["*attn.qkv", "*attn.proj"])  # fnmatch on module names
    train_also: List[str] = field(default_factory=lambda: ["cls_head.*"])  # trained in full (new heads)


@dataclass
class DistillTaskConfig:
    """``task=distill``: the student (``model.*``) learns from a frozen teacher."""

    teacher: Optional[str] = None  # our checkpoint/run/best dir or a Hugging Face directory (model.init_from rules)
    temperature: float = 2.0  # softens both distributions; the KL term is scaled by T^2
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * next-token CE
    teacher_dtype: TeacherDtype = TeacherDtype.auto  # auto = bf16 where the device supports it (CUDA), else fp32


@dataclass
class TaskConfig:
    """The objective; each kind reads its own sub-section (conf/task/<kind>.yaml)."""

    kind: TaskKind = TaskKind.pretrain
    mlm_nsp: MlmNspTaskConfig = field(default_factory=MlmNspTaskConfig)
    classify: ClassifyTaskConfig = field(default_factory=ClassifyTaskConfig)
    distill: DistillTaskConfig = field(default_factory=DistillTaskConfig)
    # Fine-tuning options, any task (dist_llm/train/tasks/finetune.py):
    freeze_layers: int = 0  # freeze the embeddings and the first N blocks
    layer_lr_decay: float = 1.0  # block i gets lr * decay^(n_layers + 1 - depth); 1.0 = off
    lora: LoraConfig = field(default_factory=LoraConfig)


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
    debug: DebugConfig = field(default_factory=DebugConfig)
    task: TaskConfig = field(default_factory=TaskConfig)



# --- Encoders (BERT, ViT): built from ModelConfig by dist_llm.models.encoder_config ---------------


@dataclass
class EncoderConfig:
    """A bidirectional encoder. Text fields are used by ``bert``, image fields by ``vit``."""

    arch: EncoderArch = EncoderArch.bert
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_ff: Optional[int] = None  # None = 4*d_model
    dropout: float = 0.0  # hidden and attention-probability dropout (HF's two probs, one value)
    norm_eps: float = 1e-12  # HF BERT/ViT layer_norm_eps default
    init_std: float = 0.02
    qkv_bias: bool = True
    # bert
    vocab_size: int = 256
    max_seq_len: int = 64  # learned positions (HF max_position_embeddings)
    type_vocab_size: int = 2
    pad_id: int = 0
    # vit
    image_size: int = 8
    patch_size: int = 2
    num_channels: int = 1
    num_classes: int = 10

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix; cheap, call before building."""
        arch = EncoderArch(self.arch)
        if self.d_model % self.n_heads:
            raise ValueError(f"encoder.d_model={self.d_model} is not divisible by encoder.n_heads="
                             f"{self.n_heads}: pick n_heads that divides d_model")
        for name in ("n_layers", "n_heads", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"encoder.{name} must be >= 1, got {getattr(self, name)}")
        if arch is EncoderArch.vit and self.image_size % self.patch_size:
            raise ValueError(f"encoder.image_size={self.image_size} is not a multiple of "
                             f"encoder.patch_size={self.patch_size}: pick a patch size that divides it")
        if arch is EncoderArch.bert and not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"encoder.pad_id={self.pad_id} is outside encoder.vocab_size={self.vocab_size}")
