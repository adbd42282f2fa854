"""Webhooks: a job's final state POSTed to the `webhook_url` its request named, signed with its tenant's secret.

The signature follows the Standard Webhooks scheme (what OpenAI's webhooks use), so existing verifiers work:

    webhook-id: <job id>.<status>      webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256(secret, f"{webhook-id}.{webhook-timestamp}.{body}")>

The body is {"type": "video.completed" | "video.failed", "data": <the video object>}. A tenant without a secret
cannot ask for webhooks (400), so no delivery is ever unsigned. Delivery never delays a job: it runs after the
job has ended, is retried with backoff (`attempts`), and its outcome is recorded on the job (`webhook` field).
Targets on loopback, private or link-local addresses are refused unless their host is in `allowed_hosts`, so a
request cannot make the server call into its own network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from lumiere.errors import LumiereError


def parse_secrets(entries, where: str = "webhook_secrets") -> dict[str, bytes]:
    """Entries "TENANT SECRET" -> {tenant: secret}."""
    out: dict[str, bytes] = {}
    for n, entry in enumerate(entries, 1):
        parts = str(entry).split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2:
            raise LumiereError(f"{where}: entry {n} has {len(parts)} fields; expected 'TENANT SECRET'")
        out[parts[0]] = parts[1].encode()
    return out


def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def check_url(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """None when `url` may be called, else what is wrong with it (for a 400)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.hostname in allowed_hosts:
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError:
        return f"names a host that does not resolve ({parts.hostname})"
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            return (f"resolves to a non-public address ({ip}); the server's webhook_allowed_hosts must list "
                    f"{parts.hostname} to allow it")
    return None


def deliver(url: str, secret: bytes, video: dict, *, attempts: int = 3, timeout_s: float = 10.0,
            backoff_s: float = 1.0) -> dict:
    """POST the event, retrying on errors and 5xx/429; blocking (run it in a thread). Returns the outcome:
    {"delivered", "attempts", "status" (last HTTP status or None), "error" (or None)}."""
    event = {"type": "video.completed" if video["status"] == "completed" else "video.failed", "data": video}
    body = json.dumps(event, separators=(",", ":")).encode()
    webhook_id = f"{video['id']}.{video['status']}"
    status, error = None, None
    for attempt in range(1, attempts + 1):
        ts = int(time.time())
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "content-type": "application/json", "user-agent": "lumiere-webhooks/1", "webhook-id": webhook_id,
            "webhook-timestamp": str(ts), "webhook-signature": sign(secret, webhook_id, ts, body)})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - the URL was checked
                status, error = r.status, None
        except urllib.error.HTTPError as e:
            status, error = e.code, f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            status, error = None, f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if status is not None and 200 <= status < 300:
            return {"delivered": True, "attempts": attempt, "status": status, "error": None}
        if status is not None and 400 <= status < 500 and status != 429:
            break  # the receiver refused it: retrying the same body will not help
        if attempt < attempts:
            time.sleep(backoff_s * 4 ** (attempt - 1))
    return {"delivered": False, "attempts": attempt, "status": status, "error": error}
