"""Abandoned requests stop consuming the engine: a client that disconnects (or times out and closes its
connection) before its answer cancels the handler.

uvicorn and Starlette do not cancel a plain handler when its client goes: it would keep its place in the
micro-batcher and its vLLM requests would run to the end for nobody. Once the request body is read, the
ASGI receive channel has nothing left to say but ``http.disconnect``, so :class:`CancelOnDisconnect`
listens on it beside the handler and cancels the handler's task when it hears it (before the response
has started). The cancellation reaches whatever the handler awaits: a job still queued in the
micro-batcher is dropped before its batch runs, and vLLM aborts the requests of a job it is running.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left (nginx's convention); nothing is sent."""


class ClientGone(Exception):
    """The client disconnected before its answer: the handler was cancelled."""


class CancelOnDisconnect:
    """ASGI middleware: cancels the handler when its client disconnects, then raises :class:`ClientGone`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = asyncio.current_task()
        assert handler is not None
        gone = asyncio.Event()
        state = {"responding": False, "cancelled": False}
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass  # nothing but the disconnect is left once the body is read; tolerate anything else
            gone.set()
            if not state["responding"]:
                state["cancelled"] = True
                handler.cancel()

        async def receive_then_watch() -> Message:
            nonlocal watcher
            if watcher is not None:  # the body is read: the watcher owns the channel now
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch(), name="disconnect-watch")
            return message

        async def send_marking_response(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["responding"] = True  # from here on, a disconnect fails the send instead
            await send(message)

        try:
            await self.app(scope, receive_then_watch, send_marking_response)
        except asyncio.CancelledError:
            if not state["cancelled"]:
                raise  # not ours (server shutdown): pass it on
            handler.uncancel()
            raise ClientGone(f"client disconnected from {scope['method']} {scope['path']}") from None
        finally:
            if watcher is not None:
                watcher.cancel()  # not awaited: awaiting here could swallow a cancellation of this task
