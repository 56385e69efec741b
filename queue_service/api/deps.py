"""Request dependencies as `Annotated` aliases, so handler signatures read as prose.

The runtime (engine, listener, worker) is built by the lifespan and kept on
`app.state`; nothing here is created at import time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from queue_service.api.errors import NotReady, Unauthorized
from queue_service.runtime import Runtime
from queue_service.settings import Settings, api_key_digest

_bearer = HTTPBearer(auto_error=False, description="one of TASKQUEUE_API_KEYS, when set")


# The getters are coroutines though they never wait: FastAPI runs a plain `def`
# dependency in its thread pool, and three thread hops per request cost more than the
# key lookup a GET /jobs/{id} is for.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:  # the lifespan has not started, or has already stopped
        raise NotReady("the service is not running")
    return runtime


async def get_engine(runtime: Annotated[Runtime, Depends(get_runtime)]) -> AsyncEngine:
    return runtime.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


async def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With TASKQUEUE_API_KEYS set, every protected endpoint needs `Authorization: Bearer <key>`."""
    if not settings.api_keys:
        return
    if credentials is None:
        raise Unauthorized("missing bearer token: send Authorization: Bearer <key>")
    if not api_key_matches(settings, credentials.credentials):
        raise Unauthorized("the bearer token is not a valid API key")


def api_key_matches(settings: Settings, offered: str) -> bool:
    """Whether `offered` is one of the configured keys (the WebSocket's `?token=` uses it too).

    Settings hold only the keys' SHA-256 digests; the offered key is hashed and
    compared digest to digest, with `hmac.compare_digest` against every configured
    key and no early exit, so neither the time taken nor the lengths compared say
    which key nearly matched, or how long any key is.
    """
    digest = api_key_digest(offered)
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(digest, key)
    return matched
