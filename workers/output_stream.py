"""One request's outputs on their way from the step loop to whoever streams them.

Outputs the consumer has not taken yet are merged into one (their tokens and text joined, the later one's
finish, usage and seed kept), so a consumer that falls behind the steps (a slow client, a busy event loop, a router
relaying many streams) gets fewer, larger messages, and the per-message work shrinks just when it is the
bottleneck; a consumer that keeps up gets each step's output as it comes. Nothing is ever lost or reordered:
the tokens taken, joined, are the tokens the engine produced.
"""

from __future__ import annotations

import asyncio
import dataclasses

from workers.engine import RequestOutput


class OutputStream:
    def __init__(self) -> None:
        self._token_ids: list[int] = []  # of the outputs put and not taken yet
        self._texts: list[str] = []
        self._logprobs: list = []
        self._prompt_logprobs: list = []  # put once, with the first token
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self._token_ids += output.new_token_ids
        self._texts.append(output.new_text)
        self._logprobs += output.logprobs
        self._prompt_logprobs += output.prompt_logprobs
        self._latest = output
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        """``get`` raises ``error`` once what was put before it has been taken."""
        self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        """Everything put since the last ``get``, as one output (the latest one's finish and usage: usage is
        cumulative); waits while there is nothing."""
        await self._ready.wait()
        latest = self._latest
        if latest is None:
            raise self._error
        output = dataclasses.replace(latest, new_token_ids=tuple(self._token_ids), new_text="".join(self._texts),
                                     logprobs=tuple(self._logprobs), prompt_logprobs=tuple(self._prompt_logprobs))
        self._token_ids, self._texts, self._logprobs, self._prompt_logprobs, self._latest = [], [], [], [], None
        if self._error is None:
            self._ready.clear()
        return output
