"""TLS settings shared by the roles: certificate files for gRPC (TLS, mutual TLS) and NBD (STARTTLS).

A `TlsFiles` names PEM files: a certificate chain and its private key (what this side presents), and CA
certificates (what the other side's certificate must chain to). Servers turn it into
``grpc.ssl_server_credentials`` or an ``ssl.SSLContext`` for NBD; clients into
``grpc.ssl_channel_credentials`` or a client ``ssl.SSLContext``. Every file is read and checked when
the credentials are built, so a missing, unreadable or mismatched file is a `ConfigError` (exit 2) with
the flag and the path, before anything listens or connects. docs/SECURITY.md describes the settings.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from standbylib.nbd.tls import ServerTls
from standbylib.runtime import config as cfg
from standbylib.runtime.config import ConfigError

#: ``--nbd-tls`` values of the NBD servers: TLS required, offered, or not offered.
NBD_TLS_MODES = ("off", "optional", "require")


def parse_yes_no(value: object) -> bool:
    """A boolean setting given as a flag value (yes/no, true/false, on/off, 1/0) or a TOML boolean."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise ConfigError(detail=f"{value!r} is not yes or no")


@dataclass
class ClientTlsSettings:
    """TLS of the programs that call the standby's gRPC services (the primary, the backup node,
    standbyctl): their configurations inherit these settings."""

    tls_ca: str | None = cfg.setting(
        None,
        "PEM CA certificates the standby's certificate must chain to: gRPC to the standby uses TLS",
        metavar="FILE",
        env="STANDBY_TLS_CA",
    )
    tls_cert: str | None = cfg.setting(
        None,
        "PEM client certificate chain presented to the standby (mutual TLS)",
        metavar="FILE",
        env="STANDBY_TLS_CERT",
    )
    tls_key: str | None = cfg.setting(
        None, "PEM private key of --tls-cert", metavar="FILE", env="STANDBY_TLS_KEY"
    )
    tls_server_name: str | None = cfg.setting(
        None,
        "the name the standby's certificate must carry, when it is not the host connected to",
        metavar="NAME",
        env="STANDBY_TLS_SERVER_NAME",
    )

    def client_files(self) -> TlsFiles:
        """The files as a client presents and checks them."""
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca, server_name=self.tls_server_name)


@dataclass
class NbdTlsSettings:
    """The NBD server's TLS settings, shared by the daemons that export NBD (their configurations
    inherit them)."""

    nbd_tls: str = cfg.setting(
        "off",
        "TLS of the NBD exports (NBD_OPT_STARTTLS): require = clients must start TLS, optional = "
        "clients may, off = not offered",
        choices=NBD_TLS_MODES,
    )
    nbd_tls_cert: str | None = cfg.setting(
        None, "PEM certificate chain of the NBD server, if not --tls-cert", metavar="FILE"
    )
    nbd_tls_key: str | None = cfg.setting(
        None, "PEM private key of --nbd-tls-cert, if not --tls-key", metavar="FILE"
    )
    nbd_tls_ca: str | None = cfg.setting(
        None,
        "PEM CA certificates that NBD client certificates must chain to, if not --tls-ca",
        metavar="FILE",
    )
    nbd_require_client_cert: bool | None = cfg.setting(
        None,
        "NBD over TLS: yes = NBD clients must present a certificate signed by --nbd-tls-ca (or "
        "--tls-ca); no = a client certificate is checked only when presented; not set = as "
        "--require-client-cert",
        parse=parse_yes_no,
        metavar="yes|no",
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one side of a TLS connection; `flags` prefixes the flag names in error messages.

    `require_client_cert` (servers): refuse clients without a certificate that chains to `ca`.
    `server_name` (clients): the name the server's certificate must carry, when it is not the host of
    the address connected to (gRPC's ``grpc.ssl_target_name_override``)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False
    server_name: str | None = None
    flags: str = "--tls"

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    # -- checks ---------------------------------------------------------------------------------------

    def check_server(self) -> None:
        """A server needs a certificate and its key; client certificates need a CA to check them."""
        if self.require_client_cert and not self.ca:
            raise ConfigError(
                detail="--require-client-cert needs "
                f"{self.flags}-ca (the CA that client certificates must chain to)"
            )
        if not self.enabled:
            return
        if not self.cert or not self.key:
            raise ConfigError(
                detail=f"TLS needs both {self.flags}-cert and {self.flags}-key (the server's certificate "
                "and its private key)"
            )

    def check_client(self) -> None:
        """A client certificate comes with its key; a client's TLS needs the CA of the server."""
        if bool(self.cert) != bool(self.key):
            raise ConfigError(
                detail=f"{self.flags}-cert and {self.flags}-key go together (the client certificate "
                "and its private key)"
            )
        if self.enabled and not self.ca:
            raise ConfigError(
                detail=f"TLS needs {self.flags}-ca: the CA certificates the server's certificate must "
                "chain to"
            )
        if self.server_name and not self.enabled:
            raise ConfigError(detail="--tls-server-name is only used with TLS: give --tls-ca")

    # -- gRPC -----------------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """For ``add_secure_port``; mutual TLS when `require_client_cert`."""
        self.check_server()
        self._load(server_side=True)  # checks the key matches the certificate, with a clear message
        cert, key = read_pem(self.cert, f"{self.flags}-cert"), read_pem(self.key, f"{self.flags}-key")
        ca = read_pem(self.ca, f"{self.flags}-ca") if self.ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=self.require_client_cert
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        self.check_client()
        self._load(server_side=False)
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, f"{self.flags}-ca"),
            private_key=read_pem(self.key, f"{self.flags}-key") if self.key else None,
            certificate_chain=read_pem(self.cert, f"{self.flags}-cert") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    # -- NBD (Python's ssl) ---------------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for an NBD server: TLS 1.2 or later; client certificates verified
        against `ca` when given, and required with `require_client_cert`."""
        self.check_server()
        if not self.enabled:
            raise ConfigError(
                detail=f"NBD TLS needs {self.flags}-cert and {self.flags}-key (the server's certificate "
                "and its private key)"
            )
        return self._load(server_side=True)

    def client_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for an NBD client: the server's certificate verified against `ca` and
        its name (`server_name`, else the host connected to); our certificate when given."""
        self.check_client()
        if not self.enabled:
            raise ConfigError(detail=f"NBD TLS needs {self.flags}-ca (the CA of the server's certificate)")
        return self._load(server_side=False)

    def _load(self, *, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert and self.key:
            read_pem(self.cert, f"{self.flags}-cert")
            read_pem(self.key, f"{self.flags}-key")
            try:
                ctx.load_cert_chain(self.cert, self.key, password=_no_password)
            except (ssl.SSLError, ValueError, OSError) as e:
                raise ConfigError(
                    detail=f"{self.flags}-cert {self.cert} and {self.flags}-key {self.key} are not a "
                    f"certificate and its unencrypted private key: {_reason(e)}"
                ) from None
            check_certificate(self.cert, f"{self.flags}-cert", server_side=server_side)
        if self.ca:
            read_pem(self.ca, f"{self.flags}-ca")
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, ValueError, OSError) as e:
                raise ConfigError(
                    detail=f"{self.flags}-ca {self.ca} holds no usable CA certificate: {_reason(e)}"
                ) from None
        if server_side:
            if self.require_client_cert:
                ctx.verify_mode = ssl.CERT_REQUIRED
            elif self.ca:
                ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


def check_certificate(path: str, flag: str, *, server_side: bool) -> None:
    """The leaf certificate of `path` may serve its side: not expired nor yet valid, and, when it
    restricts its purposes (extended key usage), made for TLS servers (`server_side`) or clients. A
    wrong certificate is refused here, with one line, rather than by the peer at its handshake ("unsupported
    certificate purpose")."""
    with open(path, "rb") as fh:
        leaf = x509.load_pem_x509_certificate(fh.read())
    now = datetime.now(UTC)
    if leaf.not_valid_after_utc < now:
        raise ConfigError(detail=f"{flag} {path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > now:
        raise ConfigError(detail=f"{flag} {path} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if server_side else ExtendedKeyUsageOID.CLIENT_AUTH
    if wanted in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages:
        return
    names = ", ".join(getattr(u, "_name", u.dotted_string) for u in usages) or "none"
    role, needed = ("a server", "serverAuth") if server_side else ("a client", "clientAuth")
    raise ConfigError(
        detail=f"{flag} {path} is not a certificate for {role}: its extended key usage is {names}, "
        f"{role} needs {needed} (docs/SECURITY.md, Certificates)"
    )


def nbd_server_tls(
    mode: str,
    cert: str | None,
    key: str | None,
    ca: str | None,
    require_client_cert: bool,
    fallback: tuple[str | None, str | None, str | None],
) -> ServerTls | None:
    """An NBD server's TLS for ``--nbd-tls MODE`` (None when off). Its files are ``--nbd-tls-cert``,
    ``--nbd-tls-key`` and ``--nbd-tls-ca`` when any is given, else `fallback` (``--tls-cert``,
    ``--tls-key``, ``--tls-ca``). With `require_client_cert` every client must present a certificate
    that chains to the CA: ``--nbd-tls-ca``, else ``--tls-ca``."""
    if mode not in NBD_TLS_MODES:
        raise ConfigError(detail=f"--nbd-tls {mode!r} is not one of {', '.join(NBD_TLS_MODES)}")
    if mode == "off":
        return None
    own = bool(cert or key or ca)
    chosen = (cert, key, ca) if own else fallback
    if require_client_cert and not chosen[2]:
        if not fallback[2]:
            raise ConfigError(
                detail="NBD client certificates (--nbd-require-client-cert, --require-client-cert) need "
                "--nbd-tls-ca or --tls-ca: the CA that client certificates must chain to"
            )
        chosen = (chosen[0], chosen[1], fallback[2])
    files = TlsFiles(
        *chosen,
        require_client_cert=require_client_cert,
        flags="--nbd-tls" if own else "--tls",
    )
    return ServerTls(files.server_context(), required=mode == "require")


def read_pem(path: str | None, flag: str) -> bytes:
    """The bytes of the PEM file `path`; a `ConfigError` naming `flag` when it cannot be used."""
    if not path:
        raise ConfigError(detail=f"{flag} is not set")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise ConfigError(detail=f"{flag} {path}: cannot read it: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(detail=f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


def _no_password() -> bytes:
    # Called only for an encrypted key: fail instead of prompting on the terminal.
    raise ValueError("the private key is encrypted (give an unencrypted key)")


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def nbd_requires_client_cert(conf: Any) -> bool:
    """Whether NBD clients must present a certificate: ``--nbd-require-client-cert`` when set, else
    ``--require-client-cert`` (the standby's gRPC setting, the primary's NBD one)."""
    own: bool | None = conf.nbd_require_client_cert
    return bool(conf.require_client_cert) if own is None else own


def nbd_tls_of(conf: Any) -> ServerTls | None:
    """`nbd_server_tls` of a daemon's configuration (an `NbdTlsSettings` that also has the gRPC
    ``tls_cert``, ``tls_key``, ``tls_ca`` and ``require_client_cert`` settings)."""
    if conf.nbd_require_client_cert and conf.nbd_tls == "off":
        raise ConfigError(detail="--nbd-require-client-cert applies to NBD over TLS: give --nbd-tls")
    return nbd_server_tls(
        conf.nbd_tls,
        conf.nbd_tls_cert,
        conf.nbd_tls_key,
        conf.nbd_tls_ca,
        nbd_requires_client_cert(conf),
        (conf.tls_cert, conf.tls_key, conf.tls_ca),
    )
