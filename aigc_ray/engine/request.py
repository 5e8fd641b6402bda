"""EngineRequest: the handle a caller holds on one submitted request, whichever engine runs it.

The engine's side pushes tokens (``_push``) and finishes the request (``_finish``); the caller's
side reads it from any thread or event loop: ``result()`` / ``aresult()`` for the whole
completion, ``deltas()`` / ``adeltas()`` for text as it becomes final, ``cancel()`` to stop it.
The request's ``row`` holds its output (ids, text, logprobs, finish reason): a RowState for the
built-in engine, a VllmRow for vLLM. Pure Python + asyncio: never imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from aigc_ray.engine.params import GenerationResult


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    if asyncio._get_running_loop() is loop:  # vLLM's output handler on the consumer's own loop
        loop.call_soon(fn)  # no write to the loop's self-pipe, as call_soon_threadsafe makes
        return
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
        loop.call_soon_threadsafe(fn)


class EngineRequest:
    """Handle on one submitted request. Thread-safe to read from any thread or event loop."""

    def __init__(self, rid: int, prompt_ids: list[int], row, generator=None, stream=False):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.row = row
        self.generator = generator
        self.stream = stream
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.token_times: list[float] = []
        self.slot: int | None = None  # the built-in engine's KV-cache slot while running
        self.adapter = 0  # the built-in engine's adapter slot (lora.py; 0: the base model)
        self._cancelled = False
        self._on_cancel: list[Callable[[], None]] = []  # engine hooks (vLLM aborts its request)
        self._quiet_until = 0.0  # time.monotonic() before which a paced consumer needs no wake
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._wakers: list[Callable[[], None]] = []

    # ------------------------------------------------------------ consumer side

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop generating for this request (the engine drops it at its next step)."""
        if self._cancelled or self.done:
            return
        self._cancelled = True
        for hook in self._on_cancel:
            hook()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until finished; return the result or raise the engine's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result

    def deltas(self) -> Iterator[str]:
        """Yield text deltas as they become final; closing the iterator cancels the request.
        ``result()`` afterwards gives usage and finish_reason."""
        wake = threading.Event()
        self._wakers.append(wake.set)
        wake.set()
        emitted = 0
        try:
            while True:
                wake.wait()
                wake.clear()
                done, text = self.done, self._current_text()
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
                if done:
                    self.result()  # raise the engine's error, if any
                    return
        finally:
            if not self.done:
                self.cancel()

    async def adeltas(self, min_interval: Callable[[], float] | None = None) -> AsyncIterator[str]:
        """``deltas`` for asyncio consumers: deltas produced between two reads arrive as one.

        ``min_interval()`` (seconds, asked before each delta) paces the stream: a delta is held
        until that long after the previous one, so it carries every token made meanwhile. The
        last delta is never held. Serving uses this to bound chunks/s per replica under load.
        """
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._wakers.append(lambda: _call_soon(loop, wake.set))
        wake.set()
        emitted, last_sent = 0, 0.0
        try:
            while True:
                await wake.wait()
                wake.clear()
                done, text = self.done, self._current_text()
                hold = (last_sent + min_interval() - loop.time()) if min_interval else 0.0
                if not done and hold > 0:
                    self._quiet_until = time.monotonic() + hold  # no per-token wakes meanwhile
                    loop.call_later(hold, wake.set)
                    continue
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted, last_sent = len(text), loop.time()
                if done:
                    self.result()
                    return
        finally:
            if not self.done:
                self.cancel()

    async def aresult(self) -> GenerationResult:
        """``result`` for asyncio consumers; cancelling the awaiting task cancels the request."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._wakers.append(lambda: _call_soon(loop, wake.set))
        try:
            while not self.done:
                await wake.wait()
                wake.clear()
        finally:
            if not self.done:
                self.cancel()
        return self.result()

    def _current_text(self) -> str:
        if self._result is not None:
            return self._result.text
        return self.row.stream_text()

    # ------------------------------------------------------------ engine side

    def _push(self, tokens: list[int], now: float, logprobs=None) -> None:
        """Append generated tokens (one per step for the built-in engine, a delta for vLLM)."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.token_times.extend([now] * len(tokens))
        self.row.push(tokens, logprobs)

    def _finish(self, error: BaseException | None = None) -> None:
        if self._cancelled and not self.row.finished:
            self.row.finish_reason = "cancelled"
        self._error = error
        self._result = self.row.result() if error is None else None
        self.finished_at = time.perf_counter()
        self._done.set()
        self._wake()

    def _wake(self) -> None:
        for wake in list(self._wakers):
            wake()

    def _wake_stream(self) -> None:
        """Wake a streaming consumer for new tokens unless it asked for quiet (pacing)."""
        if self.stream and time.monotonic() >= self._quiet_until:
            self._wake()
