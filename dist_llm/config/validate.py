"""Cross-field checks, run before any process group starts.

Every failure names the fields, their values and a fix; all failures are reported at once so a
user fixes a config in one round trip rather than one error per launch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, List, Mapping, Optional, Tuple

from dist_llm.config.plan import RunPlan, grad_accum_steps, make_plan
from dist_llm.config.choices import DECODER_PRESETS, Choice
from dist_llm.config.schema import JobConfig


class ConfigError(ValueError):
    """A configuration that cannot run. ``problems`` lists each failed check."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


def planned_world_size(cfg: JobConfig, env: Optional[Mapping[str, str]] = None) -> int:
    """The world size this job will have, from the launcher config or the launcher's environment."""
    env = os.environ if env is None else env
    kind = cfg.launcher.kind
    if kind == "local":
        return cfg.launcher.nproc
    if kind == "slurm":
        if "SLURM_NTASKS" in env:
            return int(env["SLURM_NTASKS"])
        return cfg.launcher.nodes * cfg.launcher.tasks_per_node
    if kind == "ray":
        return cfg.launcher.ray.num_workers
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    return 1


def _megatron_problems(cfg: JobConfig, dp: int) -> List[str]:
    """Layouts the Megatron engine supports (docs/parallelism.md explains each rule)."""
    m, par, tr = cfg.model, cfg.parallel, cfg.train
    p: List[str] = []
    if par.tp > 1 and m.vocab_size % par.tp:
        p.append(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={par.tp}: the embedding and "
                 f"the LM head are split by vocabulary rows; pad model.vocab_size to a multiple of {par.tp}")
    if par.sp and par.tp < 2:
        p.append("parallel.sp=true needs parallel.tp >= 2: sequence parallelism splits the sequence over the "
                 "tensor-parallel group")
    if par.sp and par.tp > 1 and tr.seq_len % par.tp:
        p.append(f"train.seq_len={tr.seq_len} is not divisible by parallel.tp={par.tp}, needed by parallel.sp=true")
    if par.vpp > 1 and par.pp < 2:
        p.append(f"parallel.vpp={par.vpp} needs parallel.pp >= 2: virtual stages interleave a pipeline")
    mb = tr.micro_batch_size * max(dp, 1)
    n_micro = grad_accum_steps(tr.global_batch_size, tr.micro_batch_size, max(dp, 1)) \
        if mb and tr.global_batch_size % mb == 0 else None
    if par.vpp > 1 and par.pp > 1 and n_micro is not None and (n_micro < par.pp or n_micro % par.pp):
        p.append(f"the interleaved schedule (parallel.vpp={par.vpp}) needs the micro-batches per step, "
                 f"global_batch_size/(micro_batch_size*dp) = {n_micro}, to be a multiple of parallel.pp={par.pp}: "
                 f"raise train.global_batch_size or lower train.micro_batch_size")
    if par.pp > 1 and par.zero_stage not in (0, 1):
        p.append(f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: pipeline stages accumulate whole "
                 f"gradients over micro-batches, so only the optimizer state is sharded over DP; use "
                 f"zero_stage=1 (or 0)")
    if par.pp == 1 and par.zero_stage == 3:
        p.append("parallel.zero_stage=3 with parallel.engine=megatron: ZeRO-3 partitions the weights that Megatron's "
                 "tensor-parallel layers use directly; use zero_stage 1 or 2 (or the deepspeed engine for ZeRO-3)")
    if par.offload_optimizer or par.offload_params:
        p.append("parallel.offload_optimizer/offload_params are not supported by the megatron engine: use the "
                 "deepspeed engine for CPU offload")
    if par.precision == "fp16":
        p.append(f"parallel.precision=fp16 with parallel.engine=megatron (pp={par.pp}): the megatron engine has no "
                 f"loss scaler; use parallel.precision=bf16 (fp32 master weights on every layout) or fp32, or the "
                 f"deepspeed engine for fp16 with dynamic loss scaling")
    return p


def _choice_problems(node: Any, prefix: str) -> List[str]:
    """Every enum-typed field (its default is a :class:`Choice`) holds one of its values. Hydra
    already rejects a bad choice while composing; this catches configs built in Python."""
    p: List[str] = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(f.default, Choice) and value not in type(f.default).values():
            allowed = ", ".join(type(f.default).values())
            p.append(f"{prefix}{f.name}={value!r} is not one of {allowed}")
        elif dataclasses.is_dataclass(value):
            p.extend(_choice_problems(value, f"{prefix}{f.name}."))
    return p


def _model_problems(cfg: JobConfig) -> List[str]:
    """Model sizes and their fit with the sequence length."""
    m, tr = cfg.model, cfg.train
    p: List[str] = []
    for name in ("n_layers", "n_heads", "d_model", "max_seq_len", "vocab_size"):
        if getattr(m, name) < 1:
            p.append(f"model.{name}={getattr(m, name)} must be >= 1")
    if m.n_heads >= 1 and m.d_model % m.n_heads:
        p.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: "
                 f"pick a width that is a multiple of the head count")
    elif m.preset == "llama" and m.n_heads >= 1 and (m.d_model // m.n_heads) % 2:
        p.append(f"model.d_model/model.n_heads={m.d_model // m.n_heads} is odd but RoPE needs an even head "
                 f"dimension: change model.d_model or model.n_heads")
    if m.n_kv_heads is not None and (m.n_kv_heads < 1 or (m.n_heads >= 1 and m.n_heads % m.n_kv_heads)):
        p.append(f"model.n_kv_heads={m.n_kv_heads} must be >= 1 and divide model.n_heads={m.n_heads} (each "
                 f"key/value head serves n_heads/n_kv_heads query heads); or leave it null for n_heads")
    if not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout={m.dropout} must be in [0, 1)")
    if tr.seq_len > m.max_seq_len:
        p.append(f"train.seq_len={tr.seq_len} exceeds the model context model.max_seq_len={m.max_seq_len}: "
                 f"lower train.seq_len or raise model.max_seq_len")
    if tr.seq_len < 1:
        p.append(f"train.seq_len={tr.seq_len} must be >= 1")
    return p


_ENCODER_TASK = {"bert": ("mlm_nsp", "classify"), "vit": ("classify",)}


def _megatron_task_problems(cfg: JobConfig, kind: str, preset: str) -> List[str]:
    """The Megatron engines train task=pretrain on gpt2/llama (every layout) and task=mlm_nsp on
    bert (pp = 1, no sequence parallelism); docs/parallelism.md has the table."""
    par = cfg.parallel
    bert_mlm = kind == "mlm_nsp" and preset == "bert"
    if not (bert_mlm or (kind == "pretrain" and preset not in _ENCODER_TASK)):
        return [f"task.kind={kind} with model.preset={preset} is not supported by parallel.engine=megatron, "
                f"which trains task=pretrain on gpt2/llama and task=mlm_nsp on bert: use parallel.engine=deepspeed "
                f"(parallel=zero0..zero3); see docs/parallelism.md"]
    p: List[str] = []
    if bert_mlm and par.pp > 1:
        p.append(f"parallel.pp={par.pp} with model.preset=bert: the Megatron BERT runs at parallel.pp=1 only "
                 f"(tensor parallelism and ZeRO over data parallelism); set parallel.pp=1 (e.g. parallel=tp2)")
    if bert_mlm and par.sp:
        p.append("parallel.sp=true with model.preset=bert: the Megatron BERT has no sequence-parallel LayerNorms "
                 "(its LM head uses torch LayerNorm); set parallel.sp=false (e.g. parallel=tp2)")
    return p


def _task_problems(cfg: JobConfig) -> List[str]:
    """Which task runs on which model preset and engine (docs/parallelism.md has the table)."""
    kind, preset, engine = str(cfg.task.kind), str(cfg.model.preset), str(cfg.parallel.engine)
    p: List[str] = []
    if engine == "megatron":
        p.extend(_megatron_task_problems(cfg, kind, preset))
    if kind == "pretrain" and preset in _ENCODER_TASK:
        p.append(f"task=pretrain (causal LM) cannot train the encoder model.preset={preset}: use "
                 f"task={_ENCODER_TASK[preset][0]}")
    if kind == "mlm_nsp" and preset != "bert":
        p.append(f"task=mlm_nsp needs a BERT model (model=bert_tiny|bert_small), got model.preset={preset}")
    if kind == "mlm_nsp" and not 0.0 < cfg.task.mlm_nsp.mlm_prob < 1.0:
        p.append(f"task.mlm_nsp.mlm_prob={cfg.task.mlm_nsp.mlm_prob} must be in (0, 1)")
    if kind != "pretrain" and cfg.train.sample.tokens > 0:
        p.append(f"train.sample.tokens={cfg.train.sample.tokens} generates text, which only task=pretrain "
                 f"models do: set train.sample.tokens=0")
    if kind == "classify" and preset == "vit" and cfg.task.classify.max_shift < 0:
        p.append(f"task.classify.max_shift={cfg.task.classify.max_shift} must be >= 0")
    if kind == "distill":
        p += _distill_problems(cfg)
    return p + _finetune_problems(cfg)


def _finetune_problems(cfg: JobConfig) -> List[str]:
    """task.freeze_layers / layer_lr_decay / lora (dist_llm/train/tasks/finetune.py, models/lora.py)."""
    t, p = cfg.task, []
    lora = t.lora
    if lora.rank < 0 or (lora.rank > 0 and (lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0)):
        p.append(f"task.lora: rank={lora.rank} must be >= 0 (0 = off), alpha={lora.alpha} > 0 and "
                 f"dropout={lora.dropout} in [0, 1)")
    if lora.rank > 0 and not lora.target_modules:
        p.append("task.lora.target_modules is empty: name module patterns, e.g. '[*attn.qkv,*attn.proj]'")
    if not 0.0 < t.layer_lr_decay <= 1.0:
        p.append(f"task.layer_lr_decay={t.layer_lr_decay} must be in (0, 1] (1 = off)")
    if not 0 <= t.freeze_layers <= cfg.model.n_layers:
        p.append(f"task.freeze_layers={t.freeze_layers} must be in [0, model.n_layers={cfg.model.n_layers}]")
    if str(cfg.parallel.engine) == "megatron" and (lora.rank > 0 or t.freeze_layers or t.layer_lr_decay != 1.0):
        p.append("task.lora / task.freeze_layers / task.layer_lr_decay need parallel.engine=deepspeed (the Megatron "
                 "engines build their own TP model): use parallel=zero0..zero3")
    return p


def _distill_problems(cfg: JobConfig) -> List[str]:
    d, p = cfg.task.distill, []
    if str(cfg.model.preset) not in DECODER_PRESETS:
        p.append(f"task=distill trains a causal LM student (model.preset gpt2|llama), got {cfg.model.preset}")
    if not d.teacher:
        p.append("task=distill needs task.distill.teacher=<our checkpoint/run dir or a Hugging Face directory>")
    if not d.temperature > 0:
        p.append(f"task.distill.temperature={d.temperature} must be > 0")
    if not 0.0 <= d.alpha <= 1.0:
        p.append(f"task.distill.alpha={d.alpha} must be in [0, 1] (weight of the KL term; 1 - alpha on the CE)")
    return p


_ZERO_MAY_BE_0 = ("prefetch_bucket_size", "param_persistence_threshold", "max_reuse_distance")


def _layout_problems(cfg: JobConfig, world: int, dp: int) -> List[str]:
    """world = dp * tp * pp, and what each engine supports."""
    m, par = cfg.model, cfg.parallel
    p: List[str] = []
    if par.zero_stage not in (0, 1, 2, 3):
        p.append(f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3")
    for name in ("tp", "pp", "vpp"):
        if getattr(par, name) < 1:
            p.append(f"parallel.{name}={getattr(par, name)} must be >= 1")
    if world < 1:
        p.append(f"world size {world} must be >= 1 (launcher.nproc / launcher.nodes * launcher.tasks_per_node)")
    model_par = max(par.tp, 1) * max(par.pp, 1)
    if world >= 1 and world % model_par:
        p.append(f"world size {world} is not divisible by parallel.tp={par.tp} x parallel.pp={par.pp}: "
                 f"world = dp*tp*pp must hold; use a world size that is a multiple of {model_par}")
    if par.tp > 1 and m.n_heads % par.tp:
        p.append(f"model.n_heads={m.n_heads} is not divisible by parallel.tp={par.tp}: choose tp dividing the head count")
    if par.tp > 1 and m.n_kv_heads is not None and m.n_kv_heads >= 1 and m.n_kv_heads % par.tp:
        p.append(f"model.n_kv_heads={m.n_kv_heads} is not divisible by parallel.tp={par.tp}: each tensor-parallel "
                 f"rank holds whole key/value heads; choose tp dividing model.n_kv_heads")
    if m.n_layers % (max(par.pp, 1) * max(par.vpp, 1)):
        p.append(f"model.n_layers={m.n_layers} is not divisible by parallel.pp={par.pp} x parallel.vpp={par.vpp}: "
                 f"every (virtual) pipeline stage holds the same number of layers")
    if par.engine == "deepspeed" and (par.tp > 1 or par.pp > 1 or par.vpp > 1 or par.sp):
        p.append(f"parallel.tp={par.tp}, parallel.pp={par.pp}, parallel.vpp={par.vpp}, parallel.sp={par.sp}: the "
                 f"deepspeed engine is data-parallel only; tensor/pipeline/sequence parallelism need "
                 f"parallel.engine=megatron (e.g. parallel=tp2)")
    if par.engine == "megatron":
        p.extend(_megatron_problems(cfg, dp))
    if par.offload_params and par.zero_stage != 3:
        p.append(f"parallel.offload_params=true needs parallel.zero_stage=3 (got {par.zero_stage})")
    if par.offload_optimizer and par.zero_stage == 0:
        p.append("parallel.offload_optimizer=true needs parallel.zero_stage >= 1")
    if par.precision == "fp16" and par.device == "cpu":
        p.append("parallel.precision=fp16 is not supported on CPU: use fp32 or bf16")
    if par.timeout_s < 10:
        p.append(f"parallel.timeout_s={par.timeout_s} is too short for collectives; use >= 10")
    for f in dataclasses.fields(par.zero):  # 0 turns off prefetch, persistence and reuse; buckets need >= 1
        v, least = getattr(par.zero, f.name), 0 if f.name in _ZERO_MAY_BE_0 else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            p.append(f"parallel.zero.{f.name}={v!r} must be an integer >= {least} (a count of elements; the "
                     f"default is {f.default:_}): set it to a whole number such as {f.default:_}")
    return p


def _batch_problems(cfg: JobConfig, world: int, dp: int) -> List[str]:
    """global = micro * grad_accum * dp, and the data lanes that cut it."""
    par, tr, data = cfg.parallel, cfg.train, cfg.data
    p: List[str] = []
    mb, gb = tr.micro_batch_size, tr.global_batch_size
    if mb < 1 or gb < 1:
        p.append(f"train.micro_batch_size={mb} and train.global_batch_size={gb} must be >= 1")
    elif dp >= 1 and gb % (mb * dp):
        p.append(f"train.global_batch_size={gb} is not divisible by train.micro_batch_size={mb} x dp={dp} "
                 f"(world {world} / (tp {par.tp} x pp {par.pp})): global = micro * grad_accum * dp; "
                 f"use a global batch that is a multiple of {mb * dp}")
    if data.lanes < 1:
        p.append(f"data.lanes={data.lanes} must be >= 1")
    else:
        if dp >= 1 and data.lanes % dp:
            p.append(f"data.lanes={data.lanes} is not divisible by dp={dp}: each data-parallel rank reads "
                     f"whole lanes; use a multiple of {dp}")
        if gb >= 1 and gb % data.lanes:
            p.append(f"train.global_batch_size={gb} is not divisible by data.lanes={data.lanes}")
        if data.num_workers > 0 and dp >= 1 and data.lanes % (dp * data.num_workers):
            p.append(f"data.lanes={data.lanes} is not divisible by dp={dp} x data.num_workers={data.num_workers}")
    if data.num_workers < 0:
        p.append(f"data.num_workers={data.num_workers} must be >= 0")
    if not 0.0 <= data.max_bad_fraction < 1.0:
        p.append(f"data.max_bad_fraction={data.max_bad_fraction} must be in [0, 1): the share of samples "
                 f"data.bad_samples=skip may drop before the run stops")
    if not data.train and not data.build_embedded:
        p.append("data.train is empty: list at least one shard directory (data.train=[{path: ...}]) "
                 "or set data.build_embedded=true for the embedded demo corpus")
    for i, src in enumerate(data.train):
        if src.weight <= 0:
            p.append(f"data.train[{i}].weight={src.weight} must be > 0")
    return p + _source_problems(data)


_URL_SCHEMES = ("file://", "http://", "https://", "pipe:")


def _source_problems(data: Any) -> List[str]:
    """Sources named by URL (dist_llm/data/sources.py reads them) and how they are fetched."""
    p: List[str] = []
    named = [(f"data.train[{i}].path", str(s.path)) for i, s in enumerate(data.train)]
    named += [("data.val", str(data.val))] if data.val else []
    for field, url in named:
        if url.startswith("pipe:") and "{name}" not in url:
            p.append(f"{field}={url!r}: a pipe: source needs {{name}} where the file name goes, e.g. "
                     f"'pipe:aws s3 cp s3://bucket/web/train/{{name}} -' or 'pipe:cat /data/train/{{name}}'")
        elif url.startswith("file://") and not url[7:].startswith(("/", "localhost/")):
            p.append(f"{field}={url!r}: a file: URL needs an absolute path, file:///abs/dir")
        elif url.startswith(("http://", "https://")) and not url.split("://", 1)[1].split("/", 1)[0]:
            p.append(f"{field}={url!r} names no host: http(s)://host[:port]/dir")
        elif "://" in url and not url.startswith(_URL_SCHEMES):
            p.append(f"{field}={url!r}: only directories, file://, http(s):// and pipe: sources are read; "
                     f"for object storage use a command, e.g. 'pipe:aws s3 cp {url.rstrip('/')}/{{name}} -'")
    if data.retries < 0:
        p.append(f"data.retries={data.retries} must be >= 0 (extra attempts after a failed fetch of a URL source)")
    if not data.retry_backoff_s >= 0:
        p.append(f"data.retry_backoff_s={data.retry_backoff_s} must be >= 0 (seconds before the first retry, "
                 f"doubled for each next one)")
    if not data.fetch_timeout_s >= 0:
        p.append(f"data.fetch_timeout_s={data.fetch_timeout_s} must be >= 0 (0 = no limit)")
    if data.cache_dir is not None and not str(data.cache_dir).strip():
        p.append("data.cache_dir is empty: give a directory for verified remote shards, or null for no cache")
    return p


def _loop_problems(cfg: JobConfig) -> List[str]:
    """Optimizer, schedule, and the loop cadences."""
    opt, tr, data = cfg.optim, cfg.train, cfg.data
    p: List[str] = []
    if opt.lr <= 0:
        p.append(f"optim.lr={opt.lr} must be > 0")
    if not 0 <= opt.min_lr <= opt.lr:
        p.append(f"optim.min_lr={opt.min_lr} must be in [0, optim.lr={opt.lr}]")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(opt, name) < 1.0:
            p.append(f"optim.{name}={getattr(opt, name)} must be in [0, 1)")
    if opt.warmup_steps < 0 or opt.grad_clip < 0 or opt.weight_decay < 0:
        p.append("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")
    if tr.max_steps < 1:
        p.append(f"train.max_steps={tr.max_steps} must be >= 1")
    ck = tr.checkpoint
    if tr.log_every < 1 or tr.eval_every < 0 or ck.every < 0:
        p.append("train.log_every must be >= 1; train.eval_every and train.checkpoint.every >= 0 (0 = off)")
    if ck.keep_last < 1:
        p.append(f"train.checkpoint.keep_last={ck.keep_last} must be >= 1 (the latest checkpoint is always kept)")
    if tr.eval_every and not data.val and not data.build_embedded:
        p.append(f"train.eval_every={tr.eval_every} but data.val is not set: give a validation split or set eval_every=0")
    try:
        parse_profile_window(tr.profile)
    except ValueError as e:
        p.append(str(e))
    return p


def parse_profile_window(spec: str) -> Optional[Tuple[int, int]]:
    """``train.profile``: "<start>:<steps>" -> (start, steps); "" -> None."""
    if not spec:
        return None
    parts = str(spec).split(":")
    try:
        start, steps = (int(x) for x in parts)
        if start < 0 or steps < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"train.profile={spec!r} must be '<start>:<steps>' with start >= 0 and steps >= 1 "
                         f"(e.g. train.profile=10:5), or empty to turn profiling off") from None
    return start, steps


def _launcher_problems(cfg: JobConfig, world: int) -> List[str]:
    """Launcher, fault injection and the run name."""
    la, dbg = cfg.launcher, cfg.debug
    p: List[str] = []
    if la.kind == "local" and la.nproc < 1:
        p.append(f"launcher.nproc={la.nproc} must be >= 1")
    crash = dbg.crash_at_step >= 0
    if crash and not 0 <= dbg.crash_rank < max(world, 1):
        p.append(f"debug.crash_rank={dbg.crash_rank} is not a rank of this job (world size {world})")
    if dbg.step_faults and not -1 <= dbg.fault_rank < max(world, 1):
        p.append(f"debug.fault_rank={dbg.fault_rank} is not a rank of this job (world size {world}; -1 = all)")
    if dbg.sleep_at_step >= 0 and dbg.sleep_s <= 0:
        p.append(f"debug.sleep_at_step={dbg.sleep_at_step} needs debug.sleep_s > 0")
    uses_pipeline = cfg.parallel.engine == "megatron" and cfg.parallel.pp > 1
    if uses_pipeline and max(dbg.nan_at_step, dbg.spike_at_step) >= 0:
        # the pipeline schedule runs backward inside Megatron, past the loss hook these inject at
        p.append("debug.nan_at_step/debug.spike_at_step are not injected by the pipeline engine (parallel.pp > 1): "
                 "inject them at parallel.pp=1, or leave them at -1")
    p += _numerics_problems(cfg)
    if crash and dbg.crash_point in ("after_manifest", "before_latest") and dbg.crash_rank != 0:
        p.append(f"debug.crash_point={dbg.crash_point} happens on rank 0 only: set debug.crash_rank=0")
    if not cfg.name or any(c in cfg.name for c in "/\\\n\r\t") or cfg.name.startswith("."):
        p.append(f"name={cfg.name!r} must be a plain run name (no path separators, no leading dot)")
    return p


def _numerics_problems(cfg: JobConfig) -> List[str]:
    """Hang watchdog, collective timeouts and the loss-spike detector."""
    tr, par = cfg.train, cfg.parallel
    p: List[str] = []
    if tr.hang_timeout_s < 0:
        p.append(f"train.hang_timeout_s={tr.hang_timeout_s} must be >= 0 (0 = watchdog off)")
    if par.timeout_s <= 0 or par.first_step_timeout_s <= 0:
        p.append(f"parallel.timeout_s={par.timeout_s} and parallel.first_step_timeout_s="
                 f"{par.first_step_timeout_s} must be > 0 (seconds)")
    if tr.spike.factor and (tr.spike.factor <= 1 or tr.spike.window < 3):
        p.append(f"train.spike.factor={tr.spike.factor} must be > 1 (or 0 = off) and train.spike.window="
                 f"{tr.spike.window} >= 3")
    return p


def validate(cfg: JobConfig, world_size: Optional[int] = None, job_id: Optional[str] = None) -> RunPlan:
    """Raise :class:`ConfigError` listing every problem; return the job's :class:`RunPlan`."""
    world = planned_world_size(cfg) if world_size is None else world_size
    model_par = max(cfg.parallel.tp, 1) * max(cfg.parallel.pp, 1)
    dp = world // model_par
    p = [*_choice_problems(cfg, ""), *_model_problems(cfg), *_layout_problems(cfg, world, dp),
         *_batch_problems(cfg, world, dp), *_loop_problems(cfg), *_launcher_problems(cfg, world),
         *_task_problems(cfg)]
    if p:
        raise ConfigError(p)
    return make_plan(cfg, world, job_id)
