"""What a request may leave behind (no Ray): its prompt and completion text stay out of logs and
error messages unless ``serve.log_prompts`` is true.

Our own messages never quote a prompt; ``PromptGuard.clean`` also takes the request's texts out
of messages we pass on from elsewhere (vLLM's validation errors, an unexpected exception's
traceback), so the contract holds for text we did not write.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field

from pydantic import BaseModel

from aigc_ray.serve.protocol import ApiError, parse_json

log = logging.getLogger(__name__)
# Request lines go where Serve writes its own request log: the replica's log file, each line
# with the request id (a user logger at INFO is dropped by the replica's root logger).
request_log = logging.getLogger("ray.serve")

REDACTED = "<prompt text>"
MIN_SCRUB_CHARS = 4  # shorter texts are not looked for (they would match ordinary words)
LOGGED_BODY_CHARS = 4000


def request_texts(req: BaseModel) -> list[str]:
    """The free text of a parsed request: prompts, message contents, an image prompt, stop
    strings (token-id prompts hold no text)."""
    texts: list[str] = []
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts += [p for p in prompt if isinstance(p, str)]
    for m in getattr(req, "messages", None) or []:
        texts.append(m.text())
    stop = getattr(req, "stop", None)
    texts += [stop] if isinstance(stop, str) else list(stop or [])
    return [t for t in texts if t]


@dataclass
class PromptGuard:
    """One request's texts, and whether the logs may hold them (``serve.log_prompts``)."""

    log_prompts: bool
    route: str
    key: str | None = None  # the API key's fingerprint, once the key was checked
    texts: list[str] = field(default_factory=list)

    def parse(self, raw: bytes, model: type[BaseModel]) -> BaseModel:
        """``parse_json``; with log_prompts, a request is logged, and a rejected body too."""
        try:
            req = parse_json(raw, model)
        except ApiError as e:
            if self.log_prompts:
                body = raw[:LOGGED_BODY_CHARS].decode("utf-8", "replace")
                request_log.info("%s request rejected (%s): %s", self.route, e.message, body)
            raise
        self.texts = request_texts(req)
        if self.log_prompts:
            request_log.info("%s request (key %s): %s", self.route, self.key, self.texts)
        return req

    def answered(self, texts: list[str]) -> None:
        """With log_prompts, log the completion texts of a response."""
        if self.log_prompts:
            request_log.info("%s response (key %s): %s", self.route, self.key, texts)

    def scrub(self, text: str) -> str:
        """``text`` without this request's texts (unless log_prompts)."""
        if self.log_prompts:
            return text
        for t in sorted(self.texts, key=len, reverse=True):
            if len(t) >= MIN_SCRUB_CHARS:
                text = text.replace(t, REDACTED)
        return text

    def clean(self, err: ApiError) -> ApiError:
        """The error as the client may see it: without this request's texts."""
        message = self.scrub(err.message)
        if message == err.message:
            return err
        return ApiError(err.status, message, err.type, err.param, err.code)

    def log_failure(self, what: str, e: BaseException) -> None:
        """An unexpected exception, with its traceback, less this request's texts."""
        if self.log_prompts:
            log.error(what, exc_info=e)
        else:
            log.error("%s\n%s", what, self.scrub("".join(traceback.format_exception(e))))
