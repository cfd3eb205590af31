"""The admin HTTP client of a running ``vsp serve`` server, for ``vsp deltas ...``: which
server (``--url``), which token, and one call that never follows a redirect and never sends
the admin token to a route that does not take it."""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vllm_safety_patch import settings
from vllm_safety_patch.cli.common import PLAIN, error_console
from vllm_safety_patch.errors import VSPError
from vllm_safety_patch.server import ADMIN_HEADER
from vllm_safety_patch.server.rollout import NoAnswerError

DEFAULT_URL = "http://127.0.0.1:8000"


API_KEY_VAR = "VLLM_API_KEY"


def server_root(url: str) -> str:
    """``http://host:8000``, ``.../`` and ``.../v1`` all name the same server (as in
    ``vsp eval --base-url``): its root, to which the admin routes' paths are added."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise VSPError(f"'{url}' is not an http(s) URL", f"pass e.g. --url {DEFAULT_URL}")
    root = url.strip().rstrip("/")
    return root.removesuffix("/v1").rstrip("/")


def admin_token(token_file: Path | None) -> str | None:
    """The token the client sends: --token-file, else VSP_ADMIN_TOKEN; read by the server's
    own reader, so a file or token the server would refuse is refused here first."""
    environ = {k: v for k, v in os.environ.items() if k == settings.ADMIN_TOKEN.name}
    return settings.read_admin_token(environ, token_file=token_file, flag="--token-file")


# The routes that take the admin token; every other call goes without it.
ADMIN_PATHS = ("/v1/safety/deltas/activate", "/v1/safety/deltas/check")


_warned_plain: set[str] = set()


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    # Followed, a redirect would carry the Authorization header to wherever it points (even
    # another host), and turn a POST into a GET that "succeeds": every 3xx is an error.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_RefuseRedirects)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_warning(url: str) -> str | None:
    """A warning when ``url`` would carry the admin token unencrypted off this machine."""
    parts = urlsplit(url)
    if parts.scheme != "http" or is_loopback(parts.hostname):
        return None
    return (
        f"warning: the admin token goes to {parts.netloc} over plain http: anyone on the "
        "network path can read it and change the served weights; use https (a TLS proxy in "
        "front of the server) or keep this traffic on a network you trust"
    )


def _headers(url: str, body: dict | None, token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    # The admin token only goes to the admin routes (the listing is open): no other route,
    # and no host a reply points to, ever sees it.
    if token and not urlsplit(url).path.rstrip("/").endswith(ADMIN_PATHS):
        token = None
    if token:
        warning = plain_http_warning(url)
        if warning and urlsplit(url).netloc not in _warned_plain:
            _warned_plain.add(urlsplit(url).netloc)
            error_console.print(warning, soft_wrap=True, **PLAIN)
    # A server started with vLLM's --api-key checks Authorization on every /v1 path: the key
    # (env VLLM_API_KEY, as vLLM reads it) goes there and the admin token in its own header.
    api_key = os.environ.get(API_KEY_VAR, "").strip()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
        if token:
            headers[ADMIN_HEADER] = token
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _json_object(raw: bytes) -> dict | None:
    try:
        payload = json.loads(raw or b"{}")
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def call(
    method: str, url: str, body: dict | None, token: str | None, timeout: float = 120
) -> tuple[int, dict]:
    """(status, JSON body); refusals come back as their JSON, not as exceptions.

    Raises :class:`VSPError` when the server cannot be reached or answers a redirect (never
    followed), and :class:`NoAnswerError` when the request was sent but no JSON answer came
    back in ``timeout`` seconds: what it asked for may have happened."""
    data = json.dumps(body).encode() if body is not None else None
    headers = _headers(url, body, token)
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _opener.open(request, timeout=timeout) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            raise _redirect_error(method, url, error.code, error.headers.get("Location")) from None
        status, raw = error.code, error.read()
        payload = _json_object(raw)
        if payload is None:
            payload = {"error": {"message": raw.decode(errors="replace")[:500]}}
        return status, payload
    except urllib.error.URLError as error:  # not connected: nothing was sent
        raise VSPError(
            f"cannot reach {url} ({error.reason})", "check --url and that 'vsp serve' is running"
        ) from None
    except OSError as error:  # sent, then timed out or cut off
        raise NoAnswerError(
            f"{method} {url} got no answer within {timeout:g} s ({error or type(error).__name__})",
            "the server may still act on it: check what it serves (vsp deltas list) before "
            "retrying",
        ) from None
    payload = _json_object(raw)
    if payload is None:
        shown = " ".join(raw.decode(errors="replace").split())[:80]
        raise NoAnswerError(
            f"{method} {url} answered HTTP {status} with a body that is not a JSON object "
            f"({shown!r}): not a vsp serve server, or something in between rewrote it",
            "point --url at the server itself; check what it serves (vsp deltas list) before "
            "retrying",
        )
    return status, payload


def _redirect_error(method: str, url: str, code: int, location: str | None) -> VSPError:
    return VSPError(
        f"{method} {url} answered HTTP {code}, a redirect to {location or '(no Location)'}; "
        "vsp never follows redirects (one could carry the admin token elsewhere, or turn an "
        "activation into a GET that changes nothing)",
        "pass the server's own URL with --url (e.g. its https:// address if it redirects there)",
    )
