"""Per-row sampling and stopping for :func:`dist_llm.models.generate.generate_batch`.

Every row of a batch carries its own :class:`SamplingParams`: temperature, top-k and top-p are
applied as [B] tensors in one pass over the batch's logits, and each seeded row draws from its
own ``torch.Generator``, so a row samples the same tokens whatever else shares its batch.
:class:`RowState` follows one row: it applies the stop tokens and stop strings and releases
tokens to a streaming callback only once no stop string can still claim them, so the tokens
streamed are exactly the tokens returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: Optional[int] = None  # per-request reproducible sampling (own torch.Generator per row)
    stop_token_ids: Tuple[int, ...] = ()  # e.g. EOS; the stop token is not returned
    stop_strings: Tuple[str, ...] = ()  # needs `decode`; output is cut before the stop string

    def check(self, where: str, has_decode: bool) -> None:
        """Raise ValueError naming ``where`` (e.g. ``params[2]``) for a value out of range."""
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.stop_strings and not has_decode:
            problems.append("stop_strings need a `decode` function (token ids -> text)")
        if any(not s for s in self.stop_strings):
            problems.append("stop_strings must not contain an empty string")
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))


@dataclass
class GenerationResult:
    token_ids: List[int]  # new tokens only
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    # decode(token_ids) when a `decode` was given; when a stop string ended the row, the text
    # cut exactly before it (which can keep part of a token that token_ids had to drop).
    text: Optional[str] = None


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits [B, V] outside each row's top-k (``top_k`` [B], 0 = off) and
    outside its nucleus (``top_p`` [B]: the smallest set of most likely tokens whose
    probability reaches top_p, 1 = off). The most likely token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    remove = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    remove = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: Sequence[Optional[torch.Generator]], active: Sequence[bool]) -> List[int]:
    """One token per row of ``logits`` [B, V]: argmax where temperature is 0, else a draw
    from the filtered, temperature-scaled distribution with that row's generator (None = the
    global RNG). Inactive (finished) rows draw nothing, so they leave their generator alone."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, t in enumerate(temperature.tolist()) if t > 0 and active[i]]
    if sampled:
        scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
        if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
            scaled = filter_logits(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        for i in sampled:
            tokens[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return tokens.tolist()


class RowState:
    """The tokens of one row so far, its stop conditions, and the streaming callback."""

    def __init__(self, index: int, params: SamplingParams, prompt_tokens: int,
                 decode: Optional[Callable[[List[int]], str]], on_token: Optional[Callable[[int, int], None]]):
        self.index, self.params, self.prompt_tokens = index, params, prompt_tokens
        self.decode, self.on_token = decode, on_token
        self.tokens: List[int] = []
        self.released = 0  # tokens already passed to on_token
        self.finish_reason: Optional[str] = None if params.max_new_tokens > 0 else "length"
        self.text: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.finish_reason is None

    def push(self, token: int) -> None:
        """Take the next token; may finish the row ("stop" or "length")."""
        if token in self.params.stop_token_ids:
            return self._finish("stop")
        self.tokens.append(token)
        if self.params.stop_strings:
            text = self.decode(self.tokens)  # type: ignore[misc]
            found = [i for i in (text.find(s) for s in self.params.stop_strings) if i >= 0]
            if found:
                cut = min(found)
                self.tokens = self.tokens[: max(self._prefix_within(cut), self.released)]
                self.text = text[:cut]
                return self._finish("stop")
            self._release(self._prefix_within(len(text) - self._held_chars(text)))
        else:
            self._release(len(self.tokens))
        if len(self.tokens) >= self.params.max_new_tokens:
            self._finish("length")

    def result(self) -> GenerationResult:
        text = self.text
        if text is None and self.decode is not None:
            text = self.decode(self.tokens)
        return GenerationResult(list(self.tokens), self.finish_reason or "length", self.prompt_tokens, text)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._release(len(self.tokens))

    def _release(self, upto: int) -> None:
        if self.on_token is not None:
            for token in self.tokens[self.released:upto]:
                self.on_token(self.index, token)
        self.released = max(self.released, upto)

    def _held_chars(self, text: str) -> int:
        """Length of the longest end of ``text`` that could still grow into a stop string."""
        held = 0
        for stop in self.params.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _prefix_within(self, chars: int) -> int:
        """The most tokens whose decoded text stays within the first ``chars`` characters."""
        n = len(self.tokens)
        while n > self.released and len(self.decode(self.tokens[:n])) > chars:  # type: ignore[misc]
            n -= 1
        return n
