"""Labelled rows for ``pack=classify`` and ``pack=sft``: parsing and checking a JSONL row,
rendering a conversation (the tokenizer's chat template or our default one) into token ids and
a loss mask, and the embedded ``stdlib_classify`` task.

Why rows travel as canonical JSON: the pipeline's phases (clean, filter, dedup, split, tokenize)
move one string per document; a classify/sft row is serialised (its fields cleaned one by one)
into one sorted-keys JSON string, so dedup sees the whole example (text *and* label) and phase
A2 decodes it again to tokenize the fields separately.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROLES = ("system", "user", "assistant")
# The default template (tokenizers without a chat template, e.g. ours): each turn is
# "<|role|>\n" + content + "\n"; an assistant turn ends with the EOS token instead of "\n".
# The loss mask covers an assistant turn's content and its EOS, never the "<|assistant|>\n" header.
DEFAULT_HEADER = "<|{role}|>\n"


def parse_row(obj: Any, cfg: Any) -> Tuple[Optional[Dict[str, Any]], str]:
    """``(row, "")`` or ``(None, reason)``: a classify row ``{text, label}`` or an SFT row
    ``{messages: [{role, content}, ...]}`` (prompt/response rows become two messages)."""
    inp, kind = cfg.input, str(cfg.pack.kind)
    if not isinstance(obj, dict):
        return None, f"row is a JSON {type(obj).__name__}, not an object"
    if kind == "classify":
        text, label = obj.get(inp.text_field), obj.get(inp.label_field)
        if not isinstance(text, str):
            return None, f"missing text field {inp.text_field!r}" if text is None else \
                f"field {inp.text_field!r} is {type(text).__name__}, not text"
        if label is None or isinstance(label, (dict, list, float)) or label == "":
            return None, f"missing label field {inp.label_field!r}" if label is None else \
                f"field {inp.label_field!r} is {label!r}, not a class name or integer"
        label = str(label)
        if cfg.pack.labels and label not in [str(x) for x in cfg.pack.labels]:
            return None, f"unknown label {label!r} in field {inp.label_field!r} (pack.labels={list(cfg.pack.labels)})"
        return {"text": text, "label": label}, ""
    return _sft_row(obj, inp)


def _sft_row(obj: Dict[str, Any], inp: Any) -> Tuple[Optional[Dict[str, Any]], str]:
    if inp.messages_field in obj:
        msgs = obj[inp.messages_field]
        if not isinstance(msgs, list) or not msgs:
            return None, f"field {inp.messages_field!r} must be a non-empty list of {{role, content}}"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, (f"field {inp.messages_field!r}[{i}] must be {{role: one of {list(ROLES)}, "
                              f"content: text}}, got {m!r}"[:200])
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            return None, f"no response: field {inp.messages_field!r} has no non-empty assistant message"
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}, ""
    prompt, response = obj.get(inp.prompt_field), obj.get(inp.response_field)
    if not isinstance(prompt, str):
        return None, f"missing prompt field {inp.prompt_field!r}" if prompt is None else \
            f"field {inp.prompt_field!r} is {type(prompt).__name__}, not text"
    if not isinstance(response, str) or not response:
        return None, f"no response: field {inp.response_field!r} is missing or empty"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}, ""


def serialize(row: Dict[str, Any], clean: Callable[[str], str]) -> str:
    """The row with every text cleaned, as canonical JSON (one pipeline document)."""
    if "messages" in row:
        row = {"messages": [{"role": m["role"], "content": clean(m["content"])} for m in row["messages"]]}
    else:
        row = {"text": clean(row["text"]), "label": row["label"]}
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


# ---- SFT rendering ---------------------------------------------------------------------------

def chat_template(tokenizer_path: Optional[str]) -> Optional[str]:
    """The ``chat_template`` of ``tokenizer_config.json`` next to a ``tokenizer.json``, if any."""
    if not tokenizer_path:
        return None
    cfg = Path(tokenizer_path).with_name("tokenizer_config.json")
    if not cfg.is_file():
        return None
    tpl = json.loads(cfg.read_text()).get("chat_template")
    return tpl if isinstance(tpl, str) else None


def render_segments(messages: Sequence[Dict[str, str]], template: Optional[str],
                    eos_text: str) -> List[Tuple[str, bool]]:
    """The conversation as ``(text, in_loss)`` pieces whose concatenation is the rendered chat.

    With a Jinja chat template (rendered in Jinja's immutable sandbox: a template cannot run
    code), a message's piece is the difference between the renders of the conversation up to
    it and up to the one before; an assistant piece is split into its header (the render with
    ``add_generation_prompt``) and its content, which alone is in the loss.
    """
    if template is None:
        out: List[Tuple[str, bool]] = []
        for m in messages:
            out.append((DEFAULT_HEADER.format(role=m["role"]), False))
            if m["role"] == "assistant":
                out.append((m["content"] + eos_text, True))
            else:
                out.append((m["content"] + "\n", False))
        return out
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tpl = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)

    def render(msgs: Sequence[Dict[str, str]], gen: bool = False) -> str:
        return tpl.render(messages=list(msgs), add_generation_prompt=gen, eos_token=eos_text, bos_token="")

    out, prev = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = render(messages[:i], gen=True)
            if head.startswith(prev):
                out.append((head[len(prev):], False))
                prev = head
        full = render(messages[:i + 1])
        if not full.startswith(prev):
            raise ValueError("the chat template does not render conversations incrementally (a prefix of "
                             "the messages must render to a prefix of the text); use the default template")
        out.append((full[len(prev):], m["role"] == "assistant"))
        prev = full
    return out


def encode_segments(tok: Any, segments: Sequence[Tuple[str, bool]], eos_text: str,
                    eos_id: Optional[int]) -> Tuple[List[int], List[int]]:
    """Token ids and loss mask (1 = the model is trained to produce this token). Pieces are
    tokenized separately so a mask boundary is a token boundary; a trailing ``eos_text`` is
    the EOS id, not its spelling."""
    ids: List[int] = []
    mask: List[int] = []
    for text, in_loss in segments:
        tail: List[int] = []
        if eos_text and text.endswith(eos_text) and eos_id is not None:
            text, tail = text[: -len(eos_text)], [eos_id]
        piece = (tok.encode(text) if text else []) + tail
        ids.extend(piece)
        mask.extend([int(in_loss)] * len(piece))
    return ids, mask


# ---- the embedded labelled task --------------------------------------------------------------

STDLIB_CLASSES = ("asyncio", "email", "http", "importlib", "multiprocessing", "xml")


def stdlib_classify_rows(per_class: int = 200, lines: int = 8, seed: int = 0,
                         classes: Sequence[str] = STDLIB_CLASSES) -> List[Dict[str, str]]:
    """Balanced ``{"text": snippet, "label": package}`` rows: ``per_class`` snippets of ``lines``
    consecutive non-blank lines from the ``.py`` files of each top-level stdlib package (the
    embedded corpus' files, so it needs nothing but this interpreter). Deterministic in ``seed``."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    rows: List[Dict[str, str]] = []
    for pkg in classes:
        snippets: List[str] = []
        for f in sorted((root / pkg).rglob("*.py")):
            if "test" in f.parts[len(root.parts):]:
                continue
            body = [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            snippets.extend("\n".join(body[i:i + lines]) for i in range(0, len(body) - lines + 1, lines))
        if len(snippets) < per_class:
            raise RuntimeError(f"stdlib package {pkg!r} has only {len(snippets)} snippets of {lines} lines "
                               f"(< {per_class}); lower per_class")
        rows.extend({"text": s, "label": pkg} for s in rng.sample(snippets, per_class))
    rng.shuffle(rows)
    return rows


def write_stdlib_classify(path: Path, **kw: Any) -> Path:
    """:func:`stdlib_classify_rows` as a JSONL file (what ``input=stdlib_classify`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in stdlib_classify_rows(**kw)))
    tmp.replace(path)
    return path


def label_array(labels: Sequence[str]) -> np.ndarray:
    """Labels as a fixed-width unicode array (saved in ``.tok.npz`` without pickle)."""
    return np.array(list(labels), dtype=str) if len(labels) else np.zeros(0, dtype="<U1")
