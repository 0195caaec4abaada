"""What the two Megatron engines share: building the Megatron model from the plain one (through
the arch strategy of :mod:`~dist_llm.parallel.megatron.arch`: GPT or BERT), the inputs of a
micro-batch, the global loss mean, full weights in plain names, the TP RNG streams,
and the resharding checkpoint (through :mod:`~dist_llm.parallel.megatron.checkpoint`).

Subclasses add the optimizer path: :class:`~dist_llm.parallel.megatron.zero_engine.MegatronDeepSpeedEngine`
(``pp = 1``) and :class:`~dist_llm.parallel.megatron.pipeline_engine.MegatronPipelineEngine`
(``pp > 1``); docs/parallelism.md says why there are two.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from dist_llm.config.plan import grad_accum_steps
from dist_llm.config.schema import JobConfig
from dist_llm.parallel.engine import Engine
from dist_llm.parallel.layout import ParallelLayout
from dist_llm.parallel.megatron import checkpoint as ckpt
from dist_llm.parallel.megatron import model as mm
from dist_llm.parallel.megatron.arch_select import arch_for

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MegatronEngineBase(Engine):
    supports_sharded = True
    reshardable = True  # the checkpoint manager may load a checkpoint saved at another layout
    # load_plain_optimizer_state: resumes another engine's checkpoint (DeepSpeed), at any layout
    elastic = True

    @property
    def checkpoint_name(self) -> str:
        # One name for both optimizer paths: their sharded checkpoints load into each other.
        return "MegatronEngine"

    def __init__(self, cfg: JobConfig, model: torch.nn.Module, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        self.model = model  # the plain model as built (not kept in sync: use model_state_dict())
        self.ps = layout.init_megatron()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.train.seed)  # tensor-parallel dropout/init streams
        self._rng_tracker = get_cuda_rng_tracker
        par, tr = cfg.parallel, cfg.train
        self.mcfg = model.cfg  # resolved preset defaults
        self.arch = arch_for(model)  # the model-specific parts: build, adapter, TP slicing, loss
        self.gated = getattr(self.arch, "gated", False)  # kept for callers of mm.tp_slice (SwiGLU GPT)
        self.tcfg = self.arch.transformer_config(par, DTYPES[par.precision])
        # .to(dtype): a few Megatron modules ignore params_dtype (learned position embeddings are a
        # plain fp32 nn.Embedding); Megatron-LM casts the whole model the same way (Float16Module).
        dtype = DTYPES[par.precision]
        self.chunks = [c.to(layout.device, dtype) for c in self.arch.build_chunks(self.tcfg, par.vpp)]
        self._load_full(self.arch.to_megatron(model.state_dict()))
        self.grad_accum = grad_accum_steps(tr.global_batch_size, tr.micro_batch_size, layout.dp)
        T = tr.seq_len
        self._pos = torch.arange(T, device=layout.device).unsqueeze(0).expand(tr.micro_batch_size, -1)
        self._mask = torch.triu(torch.ones(1, 1, T, T, dtype=torch.bool, device=layout.device), diagonal=1)

    # --- compute ---
    def check_micro_batches(self, micro_batches: List[torch.Tensor]) -> None:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected {self.grad_accum}")

    def per_token_loss(self, module: torch.nn.Module, mb: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` losses of one micro-batch ([B, T+1] ids) through ``module`` (the last
        stage's output; other pipeline stages return their hidden states)."""
        mb = mb.to(self.layout.device, non_blocking=True)
        ids, labels = mb[:, :-1].contiguous(), mb[:, 1:].contiguous()
        return module(ids, self._pos[: ids.shape[0]], self._mask, labels=labels)

    def loss_total(self) -> torch.Tensor:
        """``[sum of micro-batch losses, count]`` (float64, on the device) to fill on the ranks
        that :meth:`global_mean` counts."""
        return torch.zeros(2, dtype=torch.float64, device=self.layout.device)

    def reports_loss(self) -> bool:
        """The last stage's TP rank 0: the one rank per DP replica whose losses are counted."""
        return self.layout.pp_rank == self.layout.pp - 1 and self.layout.tp_rank == 0

    def global_mean(self, total: torch.Tensor) -> float:
        """Mean of per-micro-batch losses over the global batch: only :meth:`reports_loss` ranks
        contribute, then one world all-reduce (the step's only host sync for the loss) gives
        every rank the same number."""
        if not self.reports_loss():
            total.zero_()
        self.layout.all_reduce_world_sum(total)
        return float(total[0] / total[1])

    # --- full weights in plain names ---
    def local_params(self) -> Dict[str, torch.nn.Parameter]:
        """This rank's parameters (all its chunks) under Megatron-full names."""
        out = {}
        for c in self.chunks:
            out.update(self.arch.local_params(c))
        return out

    @torch.no_grad()
    def _load_full(self, full: Dict[str, torch.Tensor]) -> None:
        tp, r = self.layout.tp, self.layout.tp_rank
        for name, p in self.local_params().items():
            src = full.get(name)
            if src is None and name == "output_layer.weight":  # tied: the last stage's embedding copy
                src = full["embedding.word_embeddings.weight"]
            p.copy_(self.arch.tp_slice(name, src, mm.partition_dim(p), r, tp).to(p.dtype))

    @torch.no_grad()
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Gather TP slices (all-gather over TP) and stages (all-gather over PP): every rank
        returns the full plain state dict. Collective."""
        lay = self.layout
        merged = {}
        masters = self.master_weights()
        for name, p in sorted(self.local_params().items()):
            if getattr(p, "shared", False):
                continue  # tied copy on the last stage
            t = masters[name].detach().float()
            pd = mm.partition_dim(p)
            if pd is not None and lay.tp > 1:
                parts = [torch.empty_like(t) for _ in range(lay.tp)]
                lay.all_gather(parts, t.contiguous(), group=lay.tp_group)
                t = self.arch.tp_merge(name, parts, pd)
            merged[name] = t.cpu().clone()
        if lay.pp > 1:
            stages: List[Any] = lay.all_gather_object(merged, group=lay.pp_group)
            merged = {k: v for s in stages for k, v in s.items()}
        return self.arch.to_plain(merged)

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self._load_full(self.arch.to_megatron(state))
        self.weights_changed()

    def master_weights(self) -> Dict[str, torch.Tensor]:
        """``{name: full-precision weights}`` of this rank's parameters: the fp32 masters where the
        optimizer path keeps its own (bf16 parameters), else the parameters."""
        return dict(self.local_params())

    def masters_to_save(self):
        """``{name: (parameter, fp32 master)}`` to checkpoint beside the weights, or None."""
        return None

    def set_masters(self, masters: Dict[str, torch.Tensor]) -> None:
        """Install fp32 masters loaded from a checkpoint (only called when masters_to_save is not None)."""

    def weights_changed(self) -> None:
        """Called after new weights were copied in (e.g. to refresh fp32 master copies)."""

    # --- per-rank state (the rest of the optimizer lives in the sharded checkpoint) ---
    def optimizer_state(self) -> Dict[str, Any]:
        """Only the TP-region RNG streams: moments and step go through :meth:`save_sharded`."""
        return {"rng_tracker": {k: v.clone() for k, v in self._rng_tracker().get_states().items()}}

    def load_optimizer_state(self, state: Dict[str, Any]) -> None:
        if state.get("rng_tracker"):
            self._rng_tracker().set_states(state["rng_tracker"])

    # --- resharding checkpoint: the optimizer path supplies its moments ---
    def gather_moments(self) -> ckpt.Moments:
        """The moments this rank writes (collective where the optimizer path needs it)."""
        raise NotImplementedError

    def moment_buffers(self) -> ckpt.Moments:
        """Zeros shaped like the moments this rank keeps: where a load puts them."""
        raise NotImplementedError

    def set_moments(self, got: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
        """Install loaded moments (after the weights are loaded)."""
        raise NotImplementedError

    def optimizer_step(self) -> int:
        raise NotImplementedError

    # --- elastic resume: a layout-neutral optimizer state (e.g. from a DeepSpeed checkpoint) ---
    def load_plain_optimizer_state(self, state) -> None:
        """Take this rank's TP/PP shard of every parameter's fp32 master and AdamW moments from a
        :class:`~dist_llm.parallel.elastic_state.PlainOptimizerState` (plain names, full tensors),
        and its step count. The weights are loaded already; the masters overwrite them (equal in
        fp32 runs, exact fp32 values under bf16). Collective where the optimizer path is (ZeRO)."""
        from dist_llm.parallel.megatron.elastic import GPT_PRESETS, local_slices

        if self.mcfg.preset not in GPT_PRESETS:
            raise NotImplementedError(
                f"resuming a {self.mcfg.preset} run on the Megatron engine from another engine's checkpoint is not "
                f"supported (only gpt2/llama); resume with the engine and layout it was saved with, or start a new "
                f"run from its weights with model.init_from=<checkpoint>")
        self.install_plain_state(local_slices(self, state), int(state.step))

    def install_plain_state(self, slices: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
        """Install ``{Megatron-full name: {"master", "exp_avg", "exp_avg_sq": this rank's slice}}``
        and the step count (the optimizer path's own way)."""
        raise NotImplementedError

    def save_sharded(self, directory) -> None:
        ckpt.save_sharded(directory, self.layout, self.chunks, self.gather_moments, self.optimizer_step(),
                          self.cfg.parallel.zero_stage, self.masters_to_save())

    def load_sharded(self, directory) -> None:
        buffers = self.masters_to_save()
        if buffers is not None:  # destinations: zeros, not the live masters
            buffers = {n: (p, torch.zeros_like(m)) for n, (p, m) in buffers.items()}
        got, step, masters = ckpt.load_sharded(directory, self.chunks, self.moment_buffers(), buffers)
        if buffers is not None:
            if masters is None:
                self.weights_changed()  # a checkpoint without masters: take the loaded weights
            else:
                self.set_masters(masters)
        self.set_moments(got, step)
