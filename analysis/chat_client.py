"""A small client for OpenAI-compatible ``/chat/completions`` endpoints (standard library only).

- images go inline as base64 ``data:`` URLs in the user message, each after a text label;
- HTTP 429, 5xx, timeouts and dropped connections are retried with exponential backoff (a server's
  ``Retry-After`` wins when it is longer); other 4xx answers are configuration errors and stop;
- ``min_interval`` spaces requests (a client-side rate limit);
- the API key is sent as a Bearer header and never written anywhere.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import mimetypes
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ChatError(RuntimeError):
    """The endpoint refused the request, or kept failing after every retry."""


def data_url(path: Path) -> str:
    """``data:<mime>;base64,...`` of an image file."""
    mime = mimetypes.guess_type(str(path))[0] or "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def image_message(prompt: str, images: Sequence[Tuple[str, Path]]) -> List[dict]:
    """One user message: the prompt, then ``label`` + image for each ``(label, path)``."""
    content: List[dict] = [{"type": "text", "text": prompt}]
    for label, path in images:
        content.append({"type": "text", "text": label})
        content.append({"type": "image_url", "image_url": {"url": data_url(path)}})
    return [{"role": "user", "content": content}]


class ChatClient:
    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 2.0, max_backoff: float = 60.0,
                 min_interval: float = 1.0, max_tokens: int = 50, temperature: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.min_interval, self.max_tokens, self.temperature = min_interval, max_tokens, temperature
        self.sleep = sleep
        self._last = float("-inf")
        self.retries = 0  # how many retries this client made (for the log)

    def _wait_turn(self) -> None:
        wait = self._last + self.min_interval - time.monotonic()
        if wait > 0:
            self.sleep(wait)
        self._last = time.monotonic()

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def complete(self, messages: List[dict]) -> str:
        """The first choice's message text; retries as described in the module doc."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            self._wait_turn()
            try:
                reply = self._post(body)
                return _message_text(reply, self.url)
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code not in RETRY_STATUS:
                    raise ChatError(f"{self.url} answered HTTP {err.code} {err.reason}: {detail}") from None
                why, delay = f"HTTP {err.code}", _retry_after(err.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                why, delay = f"{type(err).__name__}: {getattr(err, 'reason', err)}", None
            if attempt == self.max_retries:
                raise ChatError(f"{self.url}: still failing after {self.max_retries} retries ({why})")
            wait = min(self.max_backoff, self.backoff * 2 ** attempt)
            wait = max(wait, delay) if delay is not None else wait
            logger.warning("%s: %s; retry %d/%d in %.1f s", self.url, why, attempt + 1, self.max_retries, wait)
            self.retries += 1
            self.sleep(wait)
        raise AssertionError("unreachable")


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _message_text(reply: dict, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ChatError(f"{url}: reply without choices[0].message.content: {json.dumps(reply)[:300]}") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


# ----------------------------------------------------------------------------- answers

_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
# A whole token: not inside a word or a decimal ("img10", "3rd", "2.5" and "someone" do not count).
_NUMBER = re.compile(r"(?<![\w.])(\d+|" + "|".join(_WORDS) + r")(?!\w|\.\d)", re.IGNORECASE)


def parse_image_number(answer: str, first: int, last: int) -> Optional[int]:
    """The image number an answer names, or None when it names none or several (never a guess).

    Digits and the words zero..ten count; numbers outside ``first..last`` are ignored, and the same
    number repeated is one answer ("Image 3. I choose 3").
    """
    found = {int(m) if m.isdigit() else _WORDS[m.lower()] for m in _NUMBER.findall(answer or "")}
    found = {n for n in found if first <= n <= last}
    return found.pop() if len(found) == 1 else None
