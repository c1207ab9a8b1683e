"""Who may do what on the standby: the policy file (``--policy``), the identities a client certificate
carries, and the rules that match them (docs/SECURITY.md, Authorization by certificate identity).

A policy maps identities to roles, and each role to the volumes (glob patterns) it applies to::

    [identity."CN=primary-a"]
    primary = ["db-a"]

    [identity."URI:spiffe://example.org/backup"]
    snapshots = ["db-*"]

An identity is written ``CN=NAME`` (the subject's common name), ``DNS:NAME``, ``URI:URI`` or
``email:ADDRESS`` (a subjectAltName of that type). A client certificate carries several (its CN and
each of its DNS, URI and email names), and a client may do what any of them is granted. Roles grant
actions; `standby.authz` maps each gRPC method and the NBD exports to an action.

This module knows no gRPC nor TLS library: identities are read from grpc's auth context and from
Python's ``ssl`` certificate dictionaries, both plain mappings.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from standbylib.runtime.config import ConfigError

#: What a request does, as the policy sees it.
MIRROR = "mirror"  # Replication.Handshake and Mirror (and the data channel session that follows)
VERIFY = "verify"  # Control.Verify
STATUS = "status"  # Control.Status and ListSnapshots: see the volume
SNAPSHOT = "snapshot"  # create, delete, renew the lease of a snapshot; the changes between two
EXPORT = "export"  # open the volume's NBD exports (VOLUME@SNAPSHOT, and VOLUME once promoted)
FAILOVER = "failover"  # Control.Promote, Control.Demote, Replication.FailbackPull
ACTIONS = (MIRROR, VERIFY, STATUS, SNAPSHOT, EXPORT, FAILOVER)

#: Role -> the actions it grants on its volumes. The operators' roles nest: failover > snapshots > status.
ROLES: dict[str, frozenset[str]] = {
    "primary": frozenset({MIRROR, VERIFY}),
    "status": frozenset({STATUS}),
    "snapshots": frozenset({STATUS, SNAPSHOT, VERIFY, EXPORT}),
    "failover": frozenset({STATUS, SNAPSHOT, VERIFY, EXPORT, FAILOVER}),
}

#: How an identity is written: prefix (matched without regard to case) -> its canonical spelling.
KINDS = {"cn=": "CN=", "dns:": "DNS:", "uri:": "URI:", "email:": "email:"}

#: A volume pattern: the characters of volume names plus the glob's ``*?[]!``.
_PATTERN = re.compile(r"^[A-Za-z0-9._:+\-*?\[\]!]{1,128}$")


class PolicyError(ConfigError):
    """The policy file is unusable: exit code 2, one line naming the file."""

    template = "policy file {path}: {detail}"


def canonical_identity(text: str) -> str:
    """`text` (``CN=NAME``, ``DNS:NAME``, ``URI:URI``, ``email:ADDRESS``) in its canonical spelling:
    the prefix as written there, DNS names in lower case. ValueError when it is none of these."""
    low = text.lower()
    for prefix, spelled in KINDS.items():
        if low.startswith(prefix):
            value = text[len(prefix) :]
            if not value or value != value.strip():
                raise ValueError(f"identity {text!r} has no name after {spelled!r}, or spaces around it")
            return spelled + (value.lower() if spelled == "DNS:" else value)
    raise ValueError(
        f"identity {text!r} is not CN=NAME, DNS:NAME, URI:URI or email:ADDRESS (the subject's common "
        "name, or a subjectAltName)"
    )


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def identities_of_auth_context(auth: Mapping[str, Iterable[bytes | str]]) -> tuple[str, ...]:
    """The identities of the client certificate of a gRPC call, from its auth context
    (``context.auth_context()``: ``x509_common_name``, ``peer_dns``, ``peer_uri``, ``peer_email``);
    empty without a client certificate."""
    found: list[str] = []
    for prop, spelled in (
        ("x509_common_name", "CN="),
        ("peer_dns", "DNS:"),
        ("peer_uri", "URI:"),
        ("peer_email", "email:"),
    ):
        for value in list(auth.get(prop) or [])[: 1 if spelled == "CN=" else None]:
            text = _text(value)
            if text:
                found.append(spelled + (text.lower() if spelled == "DNS:" else text))
    return tuple(dict.fromkeys(found))


def identities_of_certificate(cert: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The identities of a peer certificate as Python's ``ssl`` returns it (``getpeercert()``: None
    without TLS, empty without a client certificate); the same as `identities_of_auth_context` gives
    for the same certificate (the first common name, then the DNS, URI and email subjectAltNames)."""
    if not cert:
        return ()
    found: list[str] = []
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if names:
        found.append("CN=" + str(names[0]))
    sans = list(cert.get("subjectAltName", ()))
    for kind, spelled in (("DNS", "DNS:"), ("URI", "URI:"), ("email", "email:")):
        for key, value in sans:
            if key == kind and value:
                found.append(spelled + (str(value).lower() if kind == "DNS" else str(value)))
    return tuple(dict.fromkeys(found))


def describe(identities: Iterable[str]) -> str:
    """The identities of a client for a message or a log line."""
    return ", ".join(identities) or "a client without a certificate"


def volume_of_export(name: str) -> str:
    """The volume of the NBD export `name` (``VOLUME@SNAPSHOT``, or ``VOLUME`` once promoted)."""
    return name.partition("@")[0]


class Policy:
    """The rules of one policy file: identity -> action -> volume patterns. Immutable, so the gRPC
    workers and NBD connection threads read it without a lock.

    `spec` is the file's path (what ``--show-config`` prints)."""

    def __init__(self, path: str, grants: Mapping[str, Mapping[str, Iterable[str]]]) -> None:
        """`grants`: canonical identity -> role -> volume patterns, as the file holds them (checked)."""
        self.spec = path
        rules: dict[str, dict[str, tuple[str, ...]]] = {}
        for identity, roles in grants.items():
            actions: dict[str, list[str]] = {}
            for role, patterns in roles.items():
                for action in ROLES[role]:
                    actions.setdefault(action, []).extend(patterns)
            rules[identity] = {action: tuple(dict.fromkeys(p)) for action, p in actions.items()}
        self._rules = rules

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"Policy({self.spec!r}, {len(self._rules)} identities)"

    @property
    def identities(self) -> list[str]:
        """The identities the policy names, in the file's order."""
        return list(self._rules)

    def allows(self, identities: Iterable[str], action: str, volume: str) -> bool:
        """Whether a client with these identities may do `action` on `volume`."""
        return any(
            fnmatch.fnmatchcase(volume, pattern)
            for identity in identities
            for pattern in self._rules.get(identity, {}).get(action, ())
        )

    def allows_any(self, identities: Iterable[str], action: str) -> bool:
        """Whether a client with these identities may do `action` on some volume (a listing then shows
        it the volumes it may see)."""
        return any(self._rules.get(identity, {}).get(action) for identity in identities)

    # -- the file -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str) -> Policy:
        """Read and check the policy file at `path`; `PolicyError` naming the file and the problem."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise PolicyError(path=path, detail=f"cannot read it: {e.strerror or e}") from None
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: bytes | str, path: str = "<policy>") -> Policy:
        """The policy the TOML text `raw` describes; `PolicyError` (one line) when it does not parse or
        names an unknown key, role or kind of identity."""
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            data = tomllib.loads(text)
        except UnicodeDecodeError as e:
            raise PolicyError(path=path, detail=f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(path=path, detail=f"not valid TOML: {e}") from None
        unknown = sorted(set(data) - {"identity"})
        if unknown:
            raise PolicyError(
                path=path, detail=f'unknown key {unknown[0]!r} (a policy holds [identity."..."] tables)'
            )
        table = data.get("identity", {})
        if not isinstance(table, dict):
            raise PolicyError(path=path, detail='"identity" must be tables: [identity."CN=NAME"]')
        grants: dict[str, dict[str, list[str]]] = {}
        for written, roles in table.items():
            try:
                identity = canonical_identity(written)
            except ValueError as e:
                raise PolicyError(path=path, detail=str(e)) from None
            if identity in grants:
                raise PolicyError(path=path, detail=f"identity {written!r} is given twice (as {identity!r})")
            if not isinstance(roles, dict):
                raise PolicyError(
                    path=path, detail=f"identity {written!r} must be a table of roles: [identity.{written!r}]"
                )
            grants[identity] = {}
            for role, patterns in roles.items():
                where = f"identity {written!r}, role {role!r}"
                if role not in ROLES:
                    raise PolicyError(path=path, detail=f"{where}: unknown role (roles: {', '.join(ROLES)})")
                if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                    raise PolicyError(
                        path=path, detail=f'{where}: must be a list of volume patterns, e.g. ["db-*"]'
                    )
                for pattern in patterns:
                    if not _PATTERN.match(pattern):
                        raise PolicyError(
                            path=path,
                            detail=f"{where}: {pattern!r} is not a volume name or glob pattern "
                            "(letters, digits, . _ : + - and * ? [ ] !)",
                        )
                grants[identity][role] = patterns
        return cls(path, grants)


def load_setting(path: str) -> Policy:
    """The ``policy`` setting's parser: the file is read and checked with the rest of the configuration
    (so ``--show-config`` checks it too)."""
    return Policy.load(str(path))
