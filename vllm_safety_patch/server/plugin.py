"""The ``vllm.endpoint_plugins`` entry point: safety routes, header middleware, state.

vLLM loads it in the API server process only, and only when ``VLLM_PLUGINS`` names
``vllm_safety_patch_server`` (``vsp serve`` sets that). Its partner on the engine side is
the general plugin ``vllm_safety_patch`` (loader + worker methods), which must be allowed
too: the routes call the worker methods through ``collective_rpc``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.types import ASGIApp

from vllm_safety_patch import settings
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.models.fingerprint import short
from vllm_safety_patch.server import canary, language, metrics
from vllm_safety_patch.server.errors import SafetyAPIError, handle_safety_error
from vllm_safety_patch.server.middleware import SafetyMiddleware
from vllm_safety_patch.server.routes import RouteGuard, activation_router, listing_router
from vllm_safety_patch.server.state import ActiveEntry, SafetyState, header_value
from vllm_safety_patch.vllm_plugin.worker_extension import ACTIVE_METHOD

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

PLUGIN_NAME = "vllm_safety_patch_server"
logger = logging.getLogger(f"vllm.{__name__}")


def install_outermost(app: FastAPI, middleware: type[SafetyMiddleware]) -> None:
    """Wrap the whole middleware stack, whatever vLLM adds after the plugins are attached,
    and apply the route allow-list (``routes.py``) there.

    ``add_middleware`` here would end up *inside* vLLM's CORS and ``--api-key`` layers
    (they are added after the plugins), so their responses would lack the header. The
    allow-list runs when the stack is built and again on any call that finds the route
    table changed: vLLM's SageMaker bootstrap builds the stack and only then adds its own
    routes (``/adapters``), which the first call (lifespan start-up) removes.
    """
    build = app.build_middleware_stack
    guard = RouteGuard(app.router)

    def build_with_safety() -> ASGIApp:
        guard()
        return middleware(build(), app.state, guard)

    app.build_middleware_stack = build_with_safety  # type: ignore[method-assign]


class SafetyEndpointPlugin:
    name = PLUGIN_NAME
    # Any server with an engine: the weights are what is patched, not a task.
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(listing_router)
        app.include_router(activation_router)
        app.add_exception_handler(SafetyAPIError, handle_safety_error)
        install_outermost(app, SafetyMiddleware)

    async def init_state(
        self, engine_client: EngineClient | None, state: State, args: Namespace
    ) -> None:
        safety = await build_state(engine_client, args)
        state.vsp_safety = safety
        hide_model_paths(state)
        metrics.publish_active(safety.header())
        await asyncio.to_thread(language.warm_up)  # the language model loads in ~0.6 s
        logger.info(
            "vsp: safety routes ready: serving %s; delta folder %s; admin token %s%s",
            safety.header(),
            safety.delta_dir,
            "configured" if safety.admin_token else "NOT configured (activation answers 403)",
            f"; hot patch unavailable: {safety.hot_patch_detail}"
            if safety.hot_patch_detail
            else "",
        )


def hide_model_paths(state: State) -> None:
    """``GET /v1/models`` gives each model a ``root``, where vLLM puts the checkpoint's path:
    it would tell every client where the server keeps its files. Show the served name there
    (the path is only used for that field)."""
    serving = getattr(state, "openai_serving_models", None)
    for base in getattr(serving, "base_model_paths", None) or []:
        base.model_path = base.name


def plugin_factory() -> SafetyEndpointPlugin:
    """Entry point target (a zero-argument factory)."""
    return SafetyEndpointPlugin()


async def build_state(engine_client: EngineClient | None, args: Namespace) -> SafetyState:
    from vllm_safety_patch.serve import check_api_keys, check_responses_store

    if engine_client is not None:
        model = str(engine_client.vllm_config.model_config.model)
        load_config = engine_client.vllm_config.load_config
    else:
        model, load_config = str(args.model), None
    model_dir = Path(model)
    served = (getattr(args, "served_model_name", None) or [model])[0]
    delta_dir = settings.served_delta_dir(model_dir)
    # Refuses to start on an unreadable or weak token: failing closed beats an admin route
    # that silently turned into "no token configured".
    admin_token = settings.read_admin_token()
    # What vLLM itself parsed (every spelling of --api-key, repeats, --config FILE), whoever
    # started the server: the launcher's own check saw only its command line.
    check_api_keys(list(getattr(args, "api_key", None) or []), os.environ, admin_token)
    check_responses_store(os.environ)
    safety = SafetyState(
        delta_dir=delta_dir,
        model_dir=model_dir,
        served_model=served,
        admin_token=admin_token,
        engine=engine_client,
        drain_timeout_s=settings.SWITCH_DRAIN_TIMEOUT_S.number(),
        send_stall_timeout_s=settings.SEND_STALL_TIMEOUT_S.number(),
        shutdown_timeout_s=settings.SHUTDOWN_TIMEOUT_S.number(),
        canary=canary.settings_from_env(),
    )
    if engine_client is not None:
        watch_shutdown(engine_client, safety)
    if safety.send_stall_timeout_s >= safety.drain_timeout_s:
        logger.warning(
            "vsp: %s (%g s) is not below %s (%g s): a client that stops reading can make a "
            "switch fail as busy; keep the stall timeout the shorter one",
            settings.SEND_STALL_TIMEOUT_S.name,
            safety.send_stall_timeout_s,
            settings.SWITCH_DRAIN_TIMEOUT_S.name,
            safety.drain_timeout_s,
        )
    safety.active, problem = _load_time_set(load_config, safety)
    problem = problem or _unsupported(engine_client, args, model_dir)
    if problem is None:
        problem = await _check_workers(safety)
    if problem is not None:
        # The open listing says why in fixed words; the admin routes and the log say it all.
        safety.hot_patch_problem, safety.hot_patch_detail = problem
    return safety


def watch_shutdown(engine_client: Any, safety: SafetyState) -> None:
    """Learn that the server is shutting down, as it begins.

    On SIGTERM vLLM's handler stops the engine (``engine_client.shutdown``, in a thread)
    before it stops the HTTP server; it offers no hook, and replacing its signal handler
    would break it. So the engine client's ``shutdown`` is wrapped: it first sets
    ``safety.shutting_down`` on the event loop, and an activation in flight answers 503 at
    once instead of failing later with the engine's "EngineCore encountered an issue".
    """
    loop = asyncio.get_running_loop()
    original = engine_client.shutdown

    def shutdown(*args: Any, **kwargs: Any) -> Any:
        try:
            loop.call_soon_threadsafe(safety.shutting_down.set)
        except RuntimeError:  # the loop is closed already: nothing is in flight
            pass
        return original(*args, **kwargs)

    engine_client.shutdown = shutdown


# Why hot patching cannot work: (words any client may read: no path, no worker error text;
# the detail, for the log and the admin routes).
Problem = tuple[str, str]


def _load_time_set(
    load_config: Any, safety: SafetyState
) -> tuple[list[ActiveEntry], Problem | None]:
    """The deltas the loader merged at start-up (it refuses to start unless all applied)."""
    from vllm_safety_patch.vllm_plugin.loader import LOAD_FORMAT, delta_paths_from_config

    if load_config is None or load_config.load_format != LOAD_FORMAT:
        return [], None
    try:
        paths, _ = delta_paths_from_config(load_config.model_loader_extra_config or {})
        entries = [
            ActiveEntry.of(safety.read_recorded(Path(path)), Path(path), safety.delta_dir)
            for path in paths
        ]
    except VSPError as error:
        public = "a delta loaded at start-up cannot be read any more"
        return [], (public, f"{public} ({error})")
    return sorted(entries, key=lambda entry: (entry.group, entry.sha256)), None


def _unsupported(engine_client: Any, args: Namespace, model_dir: Path) -> Problem | None:
    if engine_client is None:
        return "this server has no engine", "this server has no engine"
    if not (model_dir / "config.json").is_file():
        public = "the served model is not a local checkpoint folder"
        return public, f"the model '{model_dir}' is not a local checkpoint folder"
    if (getattr(args, "api_server_count", None) or 1) > 1:
        # Each API server process would keep its own record of the active set.
        words = "it needs a single API server process (--api-server-count 1)"
        return words, words
    if (getattr(args, "data_parallel_size", None) or 1) > 1:
        words = "data parallelism (one engine per rank) is not supported"
        return words, words
    return None


async def _check_workers(safety: SafetyState) -> Problem | None:
    """Ask every worker what it serves; this also caches the start-up set there."""
    assert safety.engine is not None
    try:
        replies = await safety.engine.collective_rpc(ACTIVE_METHOD)
    except Exception as error:
        fix = "VLLM_PLUGINS must allow the general plugin vllm_safety_patch"
        return (
            f"the workers lack the vsp methods; {fix}",
            f"the workers lack the vsp methods ({' '.join(str(error).split())[:200]}); {fix}",
        )
    expected = sorted(entry.sha256 for entry in safety.active)
    for reply in replies:
        found = sorted(item["sha256"] for item in reply.get("deltas", []))
        if found != expected:
            return (
                "a worker serves other deltas than this server recorded (a start-up delta "
                "file changed on disk)",
                f"a worker serves {found and [short(sha) for sha in found]} while this server "
                f"recorded {header_value(safety.active)} (a start-up delta file changed on disk)",
            )
    return None
