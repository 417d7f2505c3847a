"""PHT inside any ASGI server or framework: :class:`PHTApp`.

Mount it beside your routes (Starlette, FastAPI...) and run it with uvicorn
or hypercorn; each session runs ``client_connected_cb(reader, writer)`` with
asyncio streams, as :func:`asyncio.start_server` does. See ``docs/asgi.md``.
"""

from __future__ import annotations

from ._asgi import PHTApp

__all__ = ["PHTApp"]
