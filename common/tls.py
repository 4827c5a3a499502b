"""TLS for every gRPC port: server credentials that reload rotated files, channel credentials.

Servers (router, worker) take ``--tls-cert/--tls-key`` and optionally ``--tls-client-ca``
(mTLS: only clients holding a certificate signed by that CA complete the handshake).
The files are re-read when their modification time changes, at the next handshake:
gRPC calls the certificate-configuration fetcher of ``dynamic_ssl_server_credentials``
for every new connection, so a rotated certificate (cert-manager, a renewed Secret)
is served without a restart; connections already open keep the old one until they
close. A rotation caught half-written (unreadable or mismatched files) keeps the
previous certificate and logs why, instead of breaking new handshakes.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.config import field

logger = logging.getLogger(__name__)


class TlsFileError(ValueError):
    """A TLS file named by a flag is missing, unreadable or not PEM."""


def check_pair(cert: str, key: str, what: str) -> None:
    """``cert`` and ``key`` are given together or not at all (ValueError naming ``what``)."""
    if bool(cert) != bool(key):
        raise ValueError(
            f"{what}: give both the certificate and the key, got cert={cert!r} key={key!r}"
        )


@dataclass
class ServerTlsFields:
    """The TLS flags every gRPC server has (mixed into RouterConfig and WorkerConfig)."""

    tls_cert: str = field("", help="PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: str = field("", help="PEM private key of --tls-cert")
    tls_client_ca: str = field(
        "",
        help="PEM CA bundle: require client certificates signed by it (mTLS; needs --tls-cert)",
    )

    def check_server_tls(self) -> None:
        check_pair(self.tls_cert, self.tls_key, "--tls-cert/--tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS first)")

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)


def _check_pair_matches(cert: bytes, key: bytes, cert_file: str, key_file: str) -> None:
    """TlsFileError unless ``key`` is the private key of ``cert``'s first certificate:
    gRPC would accept the pair and fail every handshake instead."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsFileError(
            f"not a PEM certificate/key pair: {cert_file} / {key_file}: {exc}"
        ) from None
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise TlsFileError(f"{key_file} is not the private key of {cert_file}")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


class ReloadingServerCertificates:
    """The fetcher behind :func:`server_credentials`: the certificate configuration,
    rebuilt when any of the files' (mtime, size) changes. Called on gRPC's threads."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.files = [f for f in (cert_file, key_file, client_ca_file) if f]
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()  # gRPC may run handshakes on several threads
        self._stamp = self._stamps()
        self.reloads = 0
        self.initial = self._configuration()  # unreadable files fail start-up, loudly

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for f in self.files:
            st = os.stat(f)
            stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        key, cert = _read(self.key_file), _read(self.cert_file)
        _check_pair_matches(cert, key, self.cert_file, self.key_file)
        ca = _read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """None = keep serving the current configuration."""
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return None
                config = self._configuration()
            except (OSError, ValueError) as exc:
                logger.warning(
                    "TLS files changed but cannot be read (%s); keeping the old ones", exc
                )
                return None
            self._stamp = stamp
            self.reloads += 1
            logger.info("TLS certificate reloaded from %s", self.cert_file)
            return config


def server_credentials(config: ServerTlsFields) -> grpc.ServerCredentials | None:
    """The server's credentials for its flags, or None (plaintext) when TLS is off.

    Raises OSError / ValueError when a file is missing or not PEM (start-up fails)."""
    if not config.tls_enabled:
        return None
    try:
        fetcher = ReloadingServerCertificates(config.tls_cert, config.tls_key, config.tls_client_ca)
    except OSError as exc:
        raise TlsFileError(f"cannot read TLS file: {exc}") from None
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial,
        fetcher,
        require_client_authentication=bool(config.tls_client_ca),
    )


def channel_credentials(
    ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials:
    """TLS channel credentials: verify the server with ``ca_file`` (empty = the system's
    roots) and present ``cert_file``/``key_file`` when given (mTLS)."""
    check_pair(cert_file, key_file, "client certificate/key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file) if ca_file else None,
        private_key=_read(key_file) if key_file else None,
        certificate_chain=_read(cert_file) if cert_file else None,
    )
