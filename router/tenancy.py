"""Bearer tokens, the tenants they stand for, and the cache salt a tenant's requests get. Pure data.

The tokens file is YAML mapping each tenant to its tokens (``acme: [token, ...]``), or to its tokens and its
limits (``acme: {tokens: [token, ...], max_in_flight: 16, min_priority: 0}``: ``TenantLimits``). Only SHA-256
digests of the tokens are kept, and a lookup compares the presented token with every entry in constant time,
so neither the answer's timing nor a memory dump gives a token away. A token is never logged.

A tenant's cache salt is derived here from the tenant's name and whatever salt the client asked for, so a
client can partition its own tenant's cache further but can never name another tenant's salt: the tenant
name is part of every salt, unambiguously (the two parts are JSON-encoded as a list, then hashed). Every salt
of a tenant lies in the tenant's scope (``<scope>/<hash>``: ``kvstore.redis_keys.salt_scope``), so one flush
finds all of a tenant's blocks in every tier.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvstore.redis_keys import SCOPE_SEPARATOR
from workers.validation import PRIORITY_RANGE

MIN_TOKEN_CHARS = 16
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class TokensFileError(ValueError):
    """The tokens file is unreadable or malformed; the message names the file and the entry (never a token)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may ask of the router, beside the router's own limits (None: no limit of its own)."""

    max_in_flight: int | None = None  # its Generate calls at once; one more is refused RESOURCE_EXHAUSTED
    min_priority: int | None = None  # the most urgent priority it may ask for; more urgent is INVALID_ARGUMENT


class TokenTable:
    """Maps a presented bearer token to its tenant, or to None; and a tenant to its limits."""

    def __init__(self, tenants: dict[str, list[str]], limits: dict[str, TenantLimits] | None = None) -> None:
        self.limits = limits or {}
        self._entries: list[tuple[bytes, str]] = []
        seen: set[bytes] = set()
        for tenant, tokens in tenants.items():
            for token in tokens:
                digest = _digest(token)
                if digest in seen:
                    raise TokensFileError(f"tenant {tenant!r}: a token is listed twice")
                seen.add(digest)
                self._entries.append((digest, tenant))
        if not self._entries:
            raise TokensFileError("no tokens: every request would be refused")

    def tenant_of(self, presented: str | None) -> str | None:
        """Constant time in the presented token: every entry is compared, whatever matches first."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for entry_digest, tenant in self._entries:
            if hmac.compare_digest(digest, entry_digest):
                found = tenant
        return found

    @property
    def tenants(self) -> set[str]:
        return {tenant for _, tenant in self._entries}

    def limits_of(self, tenant: str) -> TenantLimits:
        return self.limits.get(tenant, TenantLimits())


def load_token_table(path: str | Path) -> TokenTable:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TokensFileError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise TokensFileError(f"{path}: must map each tenant to a list of tokens")
    tokens, limits = {}, {}
    for tenant, entry in data.items():
        if isinstance(entry, dict):
            limits[tenant] = _checked_limits(path, tenant, entry)
            entry = entry.get("tokens")
        tokens[tenant] = _checked_tokens(path, tenant, entry)
    return TokenTable(tokens, limits)


_LIMIT_KEYS = ("tokens", "max_in_flight", "min_priority")


def _checked_limits(path: str | Path, tenant: object, entry: dict) -> TenantLimits:
    unknown = sorted(str(key) for key in entry if key not in _LIMIT_KEYS)
    if unknown:
        raise TokensFileError(f"{path}: tenant {tenant!r}: unknown key {unknown[0]!r} "
                              f"(known: {', '.join(_LIMIT_KEYS)})")
    max_in_flight, min_priority = entry.get("max_in_flight"), entry.get("min_priority")
    if max_in_flight is not None and (type(max_in_flight) is not int or max_in_flight < 1):
        raise TokensFileError(f"{path}: tenant {tenant!r}: max_in_flight must be an integer >= 1, got "
                              f"{max_in_flight!r}")
    low, high = PRIORITY_RANGE
    if min_priority is not None and (type(min_priority) is not int or not low <= min_priority <= high):
        raise TokensFileError(f"{path}: tenant {tenant!r}: min_priority must be an int32, got {min_priority!r}")
    return TenantLimits(max_in_flight, min_priority)


def _checked_tokens(path: str | Path, tenant: object, tokens: object) -> list[str]:
    if not isinstance(tenant, str) or not _TENANT_NAME.match(tenant):
        raise TokensFileError(f"{path}: tenant {tenant!r}: names are 1-63 of A-Z a-z 0-9 _ . - (first alphanumeric)")
    if not isinstance(tokens, list) or not tokens:
        raise TokensFileError(f"{path}: tenant {tenant!r}: must list at least one token")
    for index, token in enumerate(tokens):
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or token != token.strip():
            raise TokensFileError(f"{path}: tenant {tenant!r}, token #{index}: must be a string of at least "
                                  f"{MIN_TOKEN_CHARS} characters without surrounding spaces")
    return tokens


def tenant_scope(tenant: str) -> str:
    """The scope of every cache salt of ``tenant``."""
    return "tenant-" + hashlib.sha256(b"kvtier-tenant:" + tenant.encode()).hexdigest()


def tenant_salt(tenant: str, client_salt: str | None) -> str:
    """The cache salt of a tenant's request: distinct for every (tenant, client salt) pair, in the tenant's
    scope."""
    encoded = json.dumps([tenant, client_salt], separators=(",", ":")).encode()
    return f"{tenant_scope(tenant)}{SCOPE_SEPARATOR}{hashlib.sha256(encoded).hexdigest()}"
