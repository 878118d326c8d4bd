"""A per-process certificate authority for ``Machine.expose(port, tls=True)``.

A test that talks TLS to an exposed guest port must be able to verify the
server: the host terminates TLS with a certificate for ``127.0.0.1`` and
``localhost`` signed by a CA made for this process (this pytest session, or
this xdist worker), whose certificate file the test trusts
(``ssl.create_default_context(cafile=machine.tls_ca)``,
``httpx.get(url, verify=machine.tls_ca)``). Nothing is trusted system-wide and
nothing outlives the process: the keys live in a private temporary directory
removed at exit.

Why the ``openssl`` command rather than a Python library: it is on every
Debian/Ubuntu host already, and the standard library has no way to make a
certificate; one CA and one server certificate per process cost ~50 ms.
"""

from __future__ import annotations

import atexit
import shutil
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import SupermachineError

#: Days the certificates are valid (a session longer than this is not a test run).
VALID_DAYS = 7
_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


class TlsSetupError(SupermachineError):
    """The session's TLS certificates could not be made (is ``openssl`` installed?)."""


@dataclass(frozen=True)
class SessionCertificates:
    """The CA certificate a test trusts, and the server certificate and key expose serves."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context with the session's certificate (TLS 1.2 and later)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


def make_certificates(directory: Path) -> SessionCertificates:
    """A fresh CA and a server certificate for 127.0.0.1/localhost, written into `directory`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsSetupError(
            "expose(tls=True) needs the openssl command (Debian/Ubuntu: apt install openssl)"
        )
    d = Path(directory)
    ca, ca_key = d / "ca.pem", d / "ca.key"
    cert, key, csr, ext = d / "server.pem", d / "server.key", d / "server.csr", d / "server.ext"
    ext.write_text(_SERVER_EXTENSIONS)
    days = str(VALID_DAYS)
    steps = [
        [openssl, "req", "-x509", *_EC, "-keyout", ca_key, "-out", ca, "-days", days,
         "-subj", "/CN=pytest-supermachine session CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *_EC, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", days, "-extfile", ext],
    ]  # fmt: skip
    for argv in steps:
        done = subprocess.run([str(a) for a in argv], capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise TlsSetupError(
                f"openssl failed making the session certificates: "
                f"{done.stderr.decode(errors='replace').strip()[-500:]}"
            )
    ca_key.unlink()  # nothing more is signed: the CA key need not exist any longer
    return SessionCertificates(ca=ca, cert=cert, key=key)


_lock = threading.Lock()
_session: SessionCertificates | None = None


def session_certificates() -> SessionCertificates:
    """This process's certificates, made on first use and removed when it exits."""
    global _session
    with _lock:
        if _session is None:
            directory = Path(tempfile.mkdtemp(prefix="supermachine-tls-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            _session = make_certificates(directory)
        return _session
