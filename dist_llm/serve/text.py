"""Text on the way out: stop strings, streamed deltas, and the chat prompt.

Streamed chunks must concatenate to exactly the non-streamed text, so both go through
:class:`TextAssembler`: it decodes the whole id list each time (a byte or BPE piece may only
become a character together with the next one) and releases text only once it can no longer
change: a trailing U+FFFD (an unfinished UTF-8 sequence) and a tail that could still grow into a
stop string are held back; text from a stop string on is never released (OpenAI semantics:
the stop string is not part of the answer).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

# The chat prompt when the tokenizer brings no template of its own (our byte/char/BPE tokenizers
# do not): one "<role>: <content>" line per message, then "assistant:" for the model to continue.
# "\nuser:" is added as a stop string so the model does not write the user's next turn.
DEFAULT_CHAT_STOP = "\nuser:"


def render_default_chat(messages: Sequence[Dict[str, str]]) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def render_chat(tokenizer, messages: Sequence[Dict[str, str]]) -> Tuple[Union[str, List[int]], Tuple[str, ...]]:
    """(prompt text or ids, extra stop strings). A tokenizer with ``apply_chat_template`` (e.g. an HF
    tokenizer with a ``chat_template``) formats and encodes its own prompt (ids, so the template's
    special tokens become their ids); else the default template as text."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if callable(apply):
        return apply(list(messages), add_generation_prompt=True, tokenize=True), ()
    return render_default_chat(messages), (DEFAULT_CHAT_STOP,)


def cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class TextAssembler:
    """Turn a growing list of token ids into text deltas (see the module docstring)."""

    def __init__(self, decode: Callable[[List[int]], str], stops: Sequence[str]):
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.ids: List[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was reached: nothing more is released

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final ("" if none)."""
        self.ids.append(int(token_id))
        if self.stopped:
            return ""
        text, hit = cut_at_stop(self._decode(self.ids), self._stops)
        if hit:
            self.stopped = True
        else:
            text = text.rstrip("\ufffd")
            if self._hold:
                text = text[: max(len(text) - self._hold, 0)]
        return self._release(text)

    def finish(self, final_ids: Optional[List[int]] = None, final_text: Optional[str] = None) -> Tuple[str, str, bool]:
        """Generation is over: (the last delta, the full text, whether a stop string ended it).
        The generator's result wins over the streamed ids: ``final_text`` (already cut before a
        stop string, keeping any part of a token before it) or else ``final_ids``."""
        ids = self.ids if final_ids is None else [int(i) for i in final_ids]
        full, hit = cut_at_stop(self._decode(ids) if final_text is None else final_text, self._stops)
        delta = full[len(self.sent):] if full.startswith(self.sent) else ""
        self.sent += delta
        return delta, full, hit

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta
