"""Static check of the one real pickle a checkpoint holds: torch DCP's ``.metadata``.

``torch.distributed.checkpoint`` reads ``.metadata`` with ``pickle.load`` (Megatron's resharding
checkpoints go through it), so a crafted file would run code when the engine loads it. The sha256
in the manifest stops a file swapped in without its manifest; this scan also stops one whose
manifest was rewritten too: every global the pickle would import must be on an allow-list of
the classes DCP metadata is made of. The scan reads opcodes (``pickletools``), it never unpickles.
"""
from __future__ import annotations

import pickletools
from typing import List, Optional, Tuple

# module -> allowed names (None: any name in that module).
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.planner": None,
    "torch.distributed.checkpoint.filesystem": None,
    "torch.distributed.checkpoint._extension": None,
    "torch.distributed._shard.sharded_tensor.metadata": None,
    "torch.distributed._shard.metadata": None,
    "torch": {"Size", "device", "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
              "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "contiguous_format",
              "channels_last", "preserve_format", "strided", "sparse_coo"},
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str", "bytes",
                 "bool", "complex", "bytearray"},
    "copyreg": {"_reconstructor"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "enum": {"Enum"},
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
               "STRING"}
_MEMO_PUT = {"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}


def pickle_globals(data: bytes) -> List[Tuple[Optional[str], Optional[str]]]:
    """Every ``(module, name)`` the pickle would import; ``(None, None)`` when a STACK_GLOBAL's
    operands are not plain strings (then it cannot be judged and must be refused)."""
    out: List[Tuple[Optional[str], Optional[str]]] = []
    memo: dict = {}
    recent: List[Optional[str]] = []  # values pushed by the last ops (None: not a known string)
    memo_next = 0
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            out.append((module, attr))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            ok = len(recent) >= 2 and recent[-1] is not None and recent[-2] is not None
            out.append((recent[-2], recent[-1]) if ok else (None, None))
            recent.append(None)
        elif name in _STRING_OPS:
            recent.append(str(arg))
        elif name in _MEMO_PUT:
            idx = memo_next if name == "MEMOIZE" else arg
            memo_next += name == "MEMOIZE"
            memo[idx] = recent[-1] if recent else None
        elif name in _MEMO_GET:
            recent.append(memo.get(arg))
        else:
            recent.append(None)
        del recent[:-4]
    return out


def forbidden_globals(data: bytes) -> List[str]:
    """The globals of ``data`` outside the allow-list, as ``module.name`` (or a reason)."""
    bad = []
    try:
        found = pickle_globals(data)
    except Exception as e:  # noqa: BLE001 - a pickle pickletools cannot walk is refused
        return [f"unreadable pickle ({e})"]
    for module, attr in found:
        if module is None:
            bad.append("a computed import (STACK_GLOBAL of non-literal strings)")
            continue
        allowed = _ALLOWED.get(module, ())
        if allowed is not None and attr not in allowed:
            bad.append(f"{module}.{attr}")
    return bad


def is_pickle(data: bytes) -> bool:
    """True when ``data`` parses as one complete pickle (protocol 2+ header, ends at STOP)."""
    if len(data) < 3 or data[:1] != b"\x80" or data[1] > 5 or data[-1:] != b".":
        return False
    try:
        last = None
        for op, _arg, pos in pickletools.genops(data):
            last = (op.name, pos)
        return last is not None and last[0] == "STOP" and last[1] == len(data) - 1
    except Exception:  # noqa: BLE001 - not a pickle
        return False
