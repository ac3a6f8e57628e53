"""The gateway's HTTP side (aiohttp, on the gateway's event loop): the OpenAI Realtime endpoint
`GET /v1/realtime` (WebSocket), its capabilities, readiness, and the browser playground at `/`.

Authentication is the gRPC API's: `Authorization: Bearer <key>` (what the `openai` SDK sends),
`x-api-key`, or, for browsers that cannot set headers, the subprotocol
`openai-insecure-api-key.<key>`. `?session_id=` resumes a dialogue; without it one is created.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from aiohttp import web

from iomni.auth import Tenants
from iomni.errors import ErrorCode, IomniError
from iomni.realtime.connection import HANDLED, NOT_SUPPORTED, Limits, RealtimeConnection
from iomni.realtime.events import EXTENSION_FRAME
from iomni.turns.runner import TurnRunner
from iomni.turns.store import DialogueStore

log = logging.getLogger(__name__)
KEY_PROTOCOL = "openai-insecure-api-key."
STATIC = Path(str(files("iomni.realtime").joinpath("static")))


class RealtimeServer:
    def __init__(
        self,
        runner: TurnRunner,
        store: DialogueStore,
        tenants: Tenants,
        metrics: Any,
        serving: Callable[[], bool],
        limits: Limits | None = None,
        max_message_bytes: int = 16 << 20,
    ) -> None:
        self.runner = runner
        self.store = store
        self.tenants = tenants
        self.metrics = metrics
        self.serving = serving
        self.limits = limits or Limits()
        self.max_message_bytes = max_message_bytes
        self.app = web.Application(client_max_size=max_message_bytes)
        self.app.add_routes(
            [
                web.get("/v1/realtime", self.realtime),
                web.get("/v1/realtime/capabilities", self.capabilities),
                web.get("/readyz", self.ready),
                web.get("/", self.playground),
                web.static("/static", STATIC),
            ]
        )
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        log.info("realtime endpoint on ws://%s:%d/v1/realtime", host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- routes ---------------------------------------------------------------------------

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.serving()
        return web.json_response({"serving": ok}, status=200 if ok else 503)

    async def playground(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def capabilities(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "client_events": sorted(HANDLED - {EXTENSION_FRAME}),
                "client_events_not_supported": NOT_SUPPORTED,
                "extensions": {
                    EXTENSION_FRAME: "a camera frame: {image: base64 JPEG/PNG}; the most "
                    "recent frames join the next turn"
                },
                "audio_formats": [{"type": "audio/pcm", "rate": 24000}],
                "turn_detection": ["server_vad", None],
                "output_modalities": [["audio"], ["text"]],
                "voice": "any name (the checkpoint's default speaker) or a data:audio/wav;base64 "
                "reference recording to clone",
            }
        )

    async def realtime(self, request: web.Request) -> web.StreamResponse:
        try:
            tenant = self.tenants.authenticate(_credentials(request))
        except IomniError as exc:
            return _refuse(exc, 401)
        if self.runner.draining or not self.serving():
            return _refuse(None, 503, "the gateway is not serving; retry on another replica")
        try:
            session_id = request.query.get("session_id", "")
            if session_id:
                await self.store.get_session(tenant, session_id)
            else:
                session_id = (await self.store.create_session(tenant)).session_id
        except IomniError as exc:
            return _refuse(exc, 404 if exc.code is ErrorCode.NOT_FOUND else 503)
        ws = web.WebSocketResponse(
            protocols=("realtime",), max_msg_size=self.max_message_bytes, heartbeat=30
        )
        await ws.prepare(request)
        self.metrics.active_streams.inc()
        try:
            connection = RealtimeConnection(
                ws, self.runner, tenant, session_id, self.metrics, self.limits
            )
            await connection.run()
        except Exception:
            log.exception("realtime connection failed")
        finally:
            self.metrics.active_streams.dec()
            if not ws.closed:
                await ws.close()
        return ws


def _credentials(request: web.Request) -> list[tuple[str, str]]:
    metadata = [
        (name.lower(), value)
        for name, value in request.headers.items()
        if name.lower() in ("authorization", "x-api-key")
    ]
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(KEY_PROTOCOL):
            metadata.append(("x-api-key", protocol[len(KEY_PROTOCOL) :]))
    return metadata


def _refuse(exc: IomniError | None, status: int, message: str = "") -> web.Response:
    body = {
        "error": {
            "type": "invalid_request_error" if status < 500 else "server_error",
            "code": exc.code.name.lower() if exc else "unavailable",
            "message": exc.detail if exc else message,
        }
    }
    return web.json_response(body, status=status)
