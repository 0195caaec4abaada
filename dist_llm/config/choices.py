"""The choices of the config: one ``str`` enum per field that takes one of a fixed set of values.

Hydra (OmegaConf) rejects a value outside the enum while composing and lists the allowed
names, so no code below re-lists them. Each enum is used by a dataclass of
:mod:`dist_llm.config.schema` (or :mod:`dist_llm.config.prepare_schema`).

This module imports nothing of ours (see shared/notes/architecture.md).
"""
from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A config choice. Member names equal their values because OmegaConf parses an enum field
    by member name: ``parallel.precision=bf16`` then works in YAML and on the command line, a bad
    value is rejected while composing with the allowed names listed, and ``x == "bf16"`` as well as
    ``f"{x}"`` behave like the plain string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    __hash__ = str.__hash__  # {"fp32": ...}[choice] finds the plain-string key

    @classmethod
    def values(cls) -> tuple:
        return tuple(m.value for m in cls)


class Preset(Choice):
    gpt2 = "gpt2"  # LayerNorm, learned positions, GELU
    llama = "llama"  # RMSNorm, RoPE, SwiGLU
    bert = "bert"  # bidirectional post-LN encoder, MLM + NSP heads (EncoderConfig via encoder_config)
    vit = "vit"  # pre-norm image encoder with a class-token classifier


# The causal LMs (dist_llm.models.gpt.GPT) and the encoders (dist_llm.models.build_encoder).
DECODER_PRESETS = (Preset.gpt2, Preset.llama)
ENCODER_PRESETS = (Preset.bert, Preset.vit)


class ServeLogLevel(Choice):
    """uvicorn's log levels (``serve.log_level``)."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


class EmbeddedData(Choice):
    stdlib = "stdlib"
    stdlib_bert = "stdlib_bert"
    digits = "digits"


class WindowOffsets(Choice):
    """Where causal token windows are cut each epoch (``data.window_offsets``, dist_llm/data/windows.py)."""

    per_epoch = "per_epoch"  # epoch e shifts every window by an offset from (seed, e, source)
    fixed = "fixed"  # every epoch reads the windows exactly as `dist-llm prepare` stored them


class TaskKind(Choice):
    """The training objective (``task`` config group, dist_llm/train/tasks/)."""

    pretrain = "pretrain"  # causal LM on token windows (today's behaviour)
    mlm_nsp = "mlm_nsp"  # BERT masked LM + next-sentence prediction on pack=bert shards
    classify = "classify"  # a label per sample (images from pack=image shards)
    sft = "sft"  # prompt/response pairs, loss on response tokens only
    distill = "distill"  # student trained on a teacher's outputs


class EngineKind(Choice):
    deepspeed = "deepspeed"
    megatron = "megatron"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Backend(Choice):
    auto = "auto"  # nccl on GPU, gloo on CPU
    gloo = "gloo"
    nccl = "nccl"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OptimizerName(Choice):
    adamw = "adamw"


class Decay(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class ProgressBar(Choice):
    auto = "auto"  # on a tty only
    on = "on"
    off = "off"


class LogBackend(Choice):
    wandb = "wandb"
    console = "console"
    none = "none"


class LogMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class LauncherKind(Choice):
    local = "local"  # mock cluster: launcher.nproc ranks as local processes
    torchrun = "torchrun"
    slurm = "slurm"
    ray = "ray"
    none = "none"  # already a rank


class CrashPoint(Choice):
    """Where fault injection (debug group) kills a rank."""

    after_step = "after_step"  # os._exit right after the optimizer step
    after_rank_files = "after_rank_files"  # SIGKILL in a save, after this rank wrote its files
    after_all_files = "after_all_files"  # in a save, after the barrier: every rank's files are written
    after_manifest = "after_manifest"  # rank 0's manifest written, directory not yet renamed
    before_latest = "before_latest"  # step-N renamed, latest not yet repointed


# What a step whose update was withheld (non-finite loss/grads, loss spike) does to the run:
# raise = stop with an error (parameters stay those of the previous step, nothing is saved);
# skip = drop that step's update on every rank, count it (train state, checkpoint), go on.
# (Functional form: `raise` is a keyword, and OmegaConf parses enum fields by member name.)
NumericsPolicy = Choice("NumericsPolicy", {"raise": "raise", "skip": "skip"})


class NanTarget(Choice):
    """Where fault injection (debug.nan_at_step) puts the non-finite value."""

    loss = "loss"  # the loss of the step's last micro-batch on the fault rank
    grad = "grad"  # one parameter's gradient on the fault rank (loss stays finite)


class EncoderArch(Choice):
    """Which encoder :func:`dist_llm.models.build_encoder` builds."""

    bert = "bert"  # post-LN text encoder, MLM + NSP heads (HF BertForPreTraining numerics)
    vit = "vit"  # pre-norm image encoder, class-token classifier (HF ViTForImageClassification)


# What the loader does with a sample that does not match its manifest (data.bad_samples):
# raise = stop, naming shard and key; skip = count it and use the shard's next good sample.
BadSamples = Choice("BadSamples", {"raise": "raise", "skip": "skip"})


class TeacherDtype(Choice):
    """The frozen teacher's dtype (``task.distill.teacher_dtype``)."""

    auto = "auto"  # bf16 where the device supports it (CUDA), else fp32
    fp32 = "fp32"
    bf16 = "bf16"
