"""A throw-away test PKI, made per run with the openssl CLI (Debian package `openssl`).

    ca.pem / ca.key                 a test CA (EC P-256, CA:TRUE, keyCertSign)
    turn.test.pem / turn.test.key   server certificate signed by the CA; its only name is
                                    DNS:turn.test (no IP address, no localhost), so a
                                    client that connects by 127.0.0.1 or localhost must
                                    reject it
    wrong.test.pem / wrong.test.key the same, for DNS:wrong.test: a server that serves it
                                    must be rejected by a client that asked for turn.test
    untrusted-ca.pem                another CA that signed nothing here: a client that
                                    trusts only it must reject the server

The certificates are fine for Chromium's verifier too: X.509 v3, subjectAltName,
extendedKeyUsage serverAuth, validity of days, not years. Keys are PKCS#8 PEM
("BEGIN PRIVATE KEY"), which OpenSSL (coturn) and rustls-pemfile both read.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass

SERVER_NAME = "turn.test"
WRONG_NAME = "wrong.test"
DAYS = "7"


@dataclass(frozen=True)
class CertFiles:
    """One server identity: certificate (PEM, leaf only) and its private key."""
    name: str
    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    dir: str
    ca: str                 # CA certificate, PEM
    server: CertFiles       # DNS:turn.test
    wrong: CertFiles        # DNS:wrong.test
    untrusted_ca: str       # a CA that signed neither certificate

    def spki_sha256_b64(self, pem: str) -> str:
        """base64(SHA-256(SubjectPublicKeyInfo DER)) of a certificate: the form
        Chromium's --ignore-certificate-errors-spki-list takes."""
        return spki_sha256_b64(pem)


def _openssl(*args: str, cwd: str) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: "
                           + r.stderr.decode(errors="replace")[-800:])


def _leaf(d: str, name: str) -> CertFiles:
    key, csr, pem, ext = (os.path.join(d, f"{name}.{x}") for x in ("key", "csr", "pem", "ext"))
    with open(ext, "w") as f:
        f.write(f"subjectAltName = DNS:{name}\n"
                "basicConstraints = critical, CA:FALSE\n"
                "keyUsage = critical, digitalSignature\n"
                "extendedKeyUsage = serverAuth\n"
                "subjectKeyIdentifier = hash\n"
                "authorityKeyIdentifier = keyid\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", DAYS,
             "-sha256", "-extfile", ext, "-out", pem, cwd=d)
    os.remove(csr)
    return CertFiles(name, pem, key)


def _ca(d: str, stem: str, cn: str) -> str:
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", f"{stem}.key", "-out", f"{stem}.pem", "-days", DAYS,
             "-sha256", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return os.path.join(d, f"{stem}.pem")


def make_pki(d: str) -> Pki:
    """Create the CAs and both server certificates in folder d (made if needed)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl CLI is not installed (tests/scripts/setup-deps.sh)")
    os.makedirs(d, exist_ok=True)
    ca = _ca(d, "ca", "turnpike e2e test CA")
    untrusted = _ca(d, "untrusted-ca", "turnpike e2e untrusted CA")
    return Pki(dir=d, ca=ca, server=_leaf(d, SERVER_NAME), wrong=_leaf(d, WRONG_NAME),
               untrusted_ca=untrusted)


def spki_sha256_b64(pem_path: str) -> str:
    r = subprocess.run(["openssl", "x509", "-in", pem_path, "-noout", "-pubkey"],
                       capture_output=True, check=True, timeout=30)
    pub = r.stdout.decode()
    body = "".join(l for l in pub.splitlines() if l and not l.startswith("-----"))
    return base64.b64encode(hashlib.sha256(base64.b64decode(body)).digest()).decode()
