"""API keys and the tenants they belong to.

A key entry is `KEY` or `KEY TENANT` (whitespace-separated; a bearer token has no spaces, so this cannot be
ambiguous), from `LUMIERE_API_KEYS` (comma-separated entries), the file in `LUMIERE_API_KEYS_FILE` (one entry per
line, `#` comments) or the app's `api_keys` arg. A key without a tenant name is a tenant of its own, named
`key-` + the first 12 hex digits of its SHA-256 (the store never holds a key). Several keys naming one tenant share
its videos and its active-job limit. A server without keys (`no_auth`) serves the single tenant `default`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from lumiere.errors import LumiereError

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def tenant_of_key(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_keys(entries: Iterable[str], where: str = "api_keys") -> tuple[tuple[bytes, str], ...]:
    """Key entries -> ((key bytes, tenant), …). A malformed entry is a one-line error naming `where` (the key
    itself is never echoed)."""
    out: list[tuple[bytes, str]] = []
    for n, entry in enumerate(entries, 1):
        parts = str(entry).split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) > 2:
            raise LumiereError(f"{where}: entry {n} has {len(parts)} fields; expected 'KEY' or 'KEY TENANT'")
        tenant = parts[1] if len(parts) == 2 else tenant_of_key(parts[0])
        if not _TENANT.fullmatch(tenant):
            raise LumiereError(f"{where}: entry {n} names tenant {tenant!r}; a tenant name is 1-64 letters, digits "
                               "or _.@- (starting with a letter or digit)")
        out.append((parts[0].encode(), tenant))
    return tuple(out)


def tenant_for_token(token: str, keys: tuple[tuple[bytes, str], ...]) -> str | None:
    """The tenant of a bearer token, or None. Constant time: every key is compared, whatever matches."""
    token_b = token.encode()
    found: str | None = None
    for key, tenant in keys:
        if hmac.compare_digest(token_b, key) and found is None:
            found = tenant
    return found
