"""Token choice and per-request output: top-k/top-p filtering, seeded sampling, stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aigc_ray.engine.params import GenerationResult, SamplingParams, TokenLogprob


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus (top-p) sets.

    ``logits`` is [rows, vocab] (already temperature-scaled); ``top_k`` [rows] int (0 = off),
    ``top_p`` [rows] float (1 = off). The most likely token of each row is always kept.
    """
    needs_k = top_k > 0
    needs_p = top_p < 1
    if not bool(needs_k.any() or needs_p.any()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    remove = needs_k[:, None] & (ranks[None, :] >= top_k[:, None])
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= needs_p[:, None] & (mass_before >= top_p[:, None])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded for one request, or None (global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Chooses the next token of every row, each with its own params and generator.

    ``generators`` belong to the requests (not to the sampler), so a request keeps its random
    stream when the batch around it changes and a new Sampler is built.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        device: torch.device,
    ):
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        self.temperature = torch.tensor(temps, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.generators = list(generators)
        self.sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
        self._rows = torch.tensor(self.sampled_rows, device=device, dtype=torch.long)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return next token ids [rows] (long) for ``logits`` [rows, vocab]."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        if not self.sampled_rows:
            return tokens
        rows = self._rows
        scaled = logits[rows] / self.temperature[rows, None]
        probs = filter_logits(scaled, self.top_k[rows], self.top_p[rows]).softmax(dim=-1)
        # One multinomial per row so each request draws only from its own generator: a seeded
        # request's random stream does not depend on its batch neighbours.
        for j, i in enumerate(self.sampled_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=self.generators[i])[0]
        return tokens


class RowState:
    """Output of one request in the built-in engine: generated ids, stop checks, finish reason,
    log-probabilities when asked for."""

    def __init__(self, prompt_tokens: int, params: SamplingParams, tokenizer, eos_ids: set[int]):
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self._tokenizer = tokenizer
        self._eos_ids = set() if params.ignore_eos else eos_ids
        self._text: str = ""
        self._text_len = 0  # number of token ids self._text was decoded from
        self._text_frozen = False  # set once a stop string cut the text
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """Decoded completion (special tokens skipped), cut before a stop string if one hit."""
        if self._text_len != len(self.token_ids) and not self._text_frozen:
            self._text = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
            self._text_len = len(self.token_ids)
        return self._text

    def stream_text(self) -> str:
        """Text safe to show now. Decoded on the consumer's side from a snapshot of the ids (list
        appends are atomic), so the scheduler thread never decodes for streams."""
        ids = self.token_ids[:]
        stop = self.params.stop
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        # The scheduler may not have checked the newest token against the stop strings yet.
        cut = [i for s in stop if (i := text.find(s)) >= 0]
        return text[: min(cut)] if cut else stable_prefix(text, stop)

    def push(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        """Append generated tokens (ignored once finished) and update the finish reason."""
        for i, token_id in enumerate(tokens):
            if self.finished:
                return
            if self.logprobs is not None and logprobs is not None:
                self.logprobs.append(logprobs[i])
            self._push_one(token_id)

    def _push_one(self, token_id: int) -> None:
        # Only text decoded since the last check (plus a stop-length overlap) can hold a new hit.
        # Trailing U+FFFD (partial UTF-8) may still change when the next byte arrives.
        search_from = max(0, len(self._text.rstrip("\ufffd")) - self._max_stop + 1)
        self.token_ids.append(token_id)
        hit_eos = token_id in self._eos_ids
        if hit_eos or (self.params.stop and self._hit_stop(search_from)):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def _hit_stop(self, search_from: int) -> bool:
        text = self.text
        hits = [i for s in self.params.stop if (i := text.find(s, search_from)) >= 0]
        if not hits:
            return False
        self._text = text[: min(hits)]
        self._text_frozen = True
        return True

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=list(self.token_ids),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            finish_reason=self.finish_reason or "length",
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
        )


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """Log-probabilities of ``chosen`` [rows] under ``logits`` [rows, vocab] (raw, before any
    temperature or filtering), each with its ``top_n`` most likely alternatives."""
    logp = logits.float().log_softmax(dim=-1)
    picked = logp.gather(-1, chosen[:, None].long())[:, 0].tolist()
    tops_v, tops_i = logp.topk(top_n, dim=-1) if top_n else (None, None)
    out = []
    for r, token in enumerate(chosen.tolist()):
        top = list(zip(tops_i[r].tolist(), tops_v[r].tolist(), strict=True)) if top_n else []
        out.append(TokenLogprob(token, picked[r], top))
    return out


def prompt_token_logprobs(logits: torch.Tensor, ids: list[int], top_n: int) -> list:
    """Prompt logprobs from the logits at every prompt position [T, vocab]: entry t scores
    ``ids[t]`` given ``ids[:t]``; the first entry is None (nothing precedes it)."""
    if len(ids) < 2:
        return [None] * len(ids)
    chosen = torch.tensor(ids[1:], device=logits.device)
    return [None, *token_logprobs(logits[: len(ids) - 1], chosen, top_n)]


def stable_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of an unfinished completion that is safe to stream: drops a trailing partial
    UTF-8 character and holds back any suffix that could still grow into a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold]
