"""Run Megatron-core on a machine without CUDA (CPU ranks over gloo): the mock cluster.

Megatron-core calls CUDA directly in many places: ``torch.cuda.current_device()`` as the
device of new tensors, literal ``device="cuda"`` in the pipeline schedules, ``.cuda()`` on
buffers, and a CUDA RNG tracker for tensor-parallel dropout and init. Nothing in Megatron's
files is patched; instead, on a CUDA-less machine, the CPU plays "the current CUDA device":

* a process-wide ``TorchFunctionMode`` rewrites CUDA device arguments (``"cuda"``, a bare int,
  ``torch.device("cuda")``) to the CPU, makes ``Tensor.cuda()`` the identity and makes
  ``Tensor.type()`` report ``torch.cuda.*`` (Megatron's optimizer compares type strings);
* ``torch.cuda.current_device`` returns ``"cpu"`` - a string, not 0, because Python run inside
  autograd's backward (Megatron's custom autograd Functions) does not see the mode;
* ``synchronize`` is a no-op, and the CUDA RNG calls map onto ``torch.default_generator`` so the
  tracker's ``fork()`` really switches the generator CPU dropout and init draw from.

Two of the RNG patches (``manual_seed``, ``_lazy_call``) fail *silently* when wrong - the
program runs with wrong random streams - so tests/test_megatron_cpu_compat.py checks the streams.

Importing this module on a machine with CUDA raises ImportError: there the real CUDA path runs.
``install()`` must run before the first import of ``megatron`` (``tensor_parallel.random`` binds
``torch.cuda._lazy_call`` by name at import time); it is idempotent.
"""
from __future__ import annotations

import collections
import sys

import torch
from torch.overrides import TorchFunctionMode

if torch.cuda.is_available():  # never silently turn a GPU run into a CPU run
    raise ImportError("dist_llm.parallel.megatron.cpu_compat is for machines without CUDA; "
                      "with a GPU, Megatron-core runs on its real CUDA path")

_CPU = torch.device("cpu")
_MODE = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare int means cuda:<int>


class CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # x.cuda(...) -> x
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):  # torch.zeros(..., device="cuda"), x.to(device=0) ...
            kwargs = {**kwargs, "device": _CPU}
        elif func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])  # x.to("cuda") positional form
        return func(*args, **kwargs)


def installed() -> bool:
    return _MODE is not None


def install() -> None:
    """Activate the layer for this process (the main thread: torch function modes are
    thread-local). Must precede ``import megatron``."""
    global _MODE
    if _MODE is not None:
        return
    if any(m == "megatron" or m.startswith("megatron.") for m in sys.modules):
        raise RuntimeError("cpu_compat.install() must run before megatron is imported: "
                           "megatron.core.tensor_parallel.random binds torch.cuda._lazy_call at import")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    # The "CUDA" generator of every device index is the CPU generator.
    torch.cuda.default_generators = collections.defaultdict(lambda: torch.default_generator)
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
    # Without this the tracker's seeds go to a (nonexistent) CUDA generator: silently wrong streams.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # CUDA defers RNG set-state callbacks until CUDA initialises, which never happens here: the
    # tracker's fork() would then not switch streams (silently). Run them at once.
    torch.cuda._lazy_call = lambda fn, **kw: fn()
    _MODE = CudaAsCpu()
    _MODE.__enter__()
