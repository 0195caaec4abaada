"""Tokenizer interop: a Hugging Face tokenizer directory <-> our tokenizer objects
(``dist_llm.data.tokenizer``).

Only fast tokenizers (a ``tokenizer.json``) are read: that file is pure data, while slow
tokenizers can need Python code or sentencepiece models. Special tokens come from
``tokenizer_config.json`` / ``special_tokens_map.json``. Our ``encode`` never adds specials (BOS
etc.), so it equals ``AutoTokenizer(...)(text, add_special_tokens=False)`` on text without
special-token strings (ours encodes those as plain text, so data cannot forge a boundary).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

from dist_llm.data.tokenizer import AnyTokenizer, ByteTokenizer, HFTokenizer
from dist_llm.interop import InteropError

# our special_ids key -> Hugging Face special-token attribute
HF_SPECIAL = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "mask": "mask_token",
              "cls": "cls_token", "sep": "sep_token"}
BYTE_SPECIALS = {"eos": "<|eos|>", "pad": "<|pad|>"}  # ByteTokenizer's ids 256 and 257


def _token_text(value: Any) -> Optional[str]:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(hf_dir: Union[str, Path]) -> Dict[str, str]:
    """our key -> token text, from special_tokens_map.json then tokenizer_config.json (which wins)."""
    out: Dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(hf_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InteropError(f"{path} is not valid JSON ({e}); fix or remove it") from e
        for ours, theirs in HF_SPECIAL.items():
            text = _token_text(data.get(theirs))
            if text:
                out[ours] = text
    return out


def has_hf_tokenizer(hf_dir: Union[str, Path]) -> bool:
    return (Path(hf_dir) / "tokenizer.json").is_file()


def tokenizer_from_hf_dir(hf_dir: Union[str, Path]) -> HFTokenizer:
    """Our tokenizer for a directory written by ``tokenizer.save_pretrained`` (fast tokenizer)."""
    hf_dir = Path(hf_dir)
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise InteropError(f"{hf_dir} has no tokenizer.json: only fast tokenizers are supported; convert it "
                           f"with AutoTokenizer.from_pretrained(dir).save_pretrained(dir) (writes tokenizer.json)")
    specials = read_special_tokens(hf_dir)
    tok = HFTokenizer(path)
    for key, text in specials.items():
        token_id = tok._tok.token_to_id(text)
        if token_id is None:
            raise InteropError(f"{hf_dir}: special token {HF_SPECIAL[key]}={text!r} is not in tokenizer.json's "
                               f"vocabulary; fix tokenizer_config.json")
        tok.special_ids[key] = token_id
    tok.eos_id, tok.pad_id = tok.special_ids.get("eos"), tok.special_ids.get("pad")
    return tok


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (what ``pre_tokenizers.ByteLevel`` maps bytes to)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_tokenizer_json(out_file: Path) -> Dict[str, str]:
    """Write a ``tokenizers`` file equivalent to :class:`ByteTokenizer`: id b = byte b (a BPE
    without merges over the GPT-2 byte alphabet), specials at 256/257."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for key in ("eos", "pad"):  # added in id order: 256, 257
        tok.add_special_tokens([AddedToken(BYTE_SPECIALS[key], special=True, normalized=False)])
    tok.save(str(out_file))
    return dict(BYTE_SPECIALS)


def export_tokenizer(tok: AnyTokenizer, out_dir: Union[str, Path], model_max_length: Optional[int] = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json so that
    ``AutoTokenizer.from_pretrained(out_dir)`` encodes like ``tok``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, HFTokenizer):
        shutil.copyfile(tok.path, out_dir / "tokenizer.json")  # the original bytes, no re-serialisation
        specials = {k: tok._tok.id_to_token(i) for k, i in tok.special_ids.items() if k in HF_SPECIAL}
    elif isinstance(tok, ByteTokenizer):
        specials = _byte_level_tokenizer_json(out_dir / "tokenizer.json")
    else:
        raise InteropError(f"tokenizer kind {tok.kind!r} cannot be exported to Hugging Face; "
                           f"train with a byte or BPE tokenizer (dist-llm prepare tokenizer=bpe)")
    special_map = {HF_SPECIAL[k]: v for k, v in specials.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, **special_map}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1, sort_keys=True))


def read_chat_template(hf_dir: Union[str, Path]) -> Optional[str]:
    """The Jinja chat template of a Hugging Face tokenizer directory: ``chat_template.jinja``
    (newer transformers) or ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of
    named templates of which ``default`` is used); None when there is none."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text()
    path = hf_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("chat_template")
    except json.JSONDecodeError as e:
        raise InteropError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


class ChatTemplateTokenizer:
    """A tokenizer plus the directory's chat template, rendered like ``transformers`` does (a
    sandboxed Jinja environment, so a template cannot reach Python objects or run code). Every
    other attribute is the wrapped tokenizer's."""

    def __init__(self, tok: AnyTokenizer, template: str, source: str) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise InteropError(f"{source}: chat_template does not parse ({e}); fix tokenizer_config.json") from e
        self._tok = tok
        self._source = source
        # The rendered prompt's own special tokens (<s>, <|im_start|>...) must become their ids, as
        # transformers encodes them; our HFTokenizer encodes specials as plain text (data safety),
        # so a second instance with special-token matching on encodes the chat prompt.
        inner = getattr(tok, "_tok", None)
        self._special_aware = None
        if inner is not None:
            from tokenizers import Tokenizer

            self._special_aware = Tokenizer.from_str(inner.to_str())
            self._special_aware.encode_special_tokens = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_tok"], name)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        from jinja2.exceptions import TemplateError

        ids = getattr(self._tok, "special_ids", {})
        inner = getattr(self._tok, "_tok", None)  # HFTokenizer's tokenizers.Tokenizer: id -> token text
        tokens = {f"{k}_token": inner.id_to_token(i) for k, i in ids.items()} if inner is not None else {}
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
        except TemplateError as e:
            raise ValueError(f"the chat template of {self._source} rejected these messages: {e}") from e
        if not tokenize:
            return text
        if self._special_aware is None:
            return self._tok.encode(text)
        return self._special_aware.encode(text, add_special_tokens=False).ids


def tokenizer_with_chat_template(tok: AnyTokenizer, hf_dir: Union[str, Path]) -> Any:
    """``tok`` with ``apply_chat_template`` when ``hf_dir`` has a chat template, else ``tok``."""
    template = read_chat_template(hf_dir)
    return tok if template is None else ChatTemplateTokenizer(tok, template, str(hf_dir))
