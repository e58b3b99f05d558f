"""`kilnproxy pki`: a CA and the certificates of agents and proxies (agent:// backends).

Built on `cryptography` (asyncssh's own dependency). ECDSA P-256 keys, written with mode 0600;
nothing is ever overwritten. The README gives the same steps with `openssl`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kilnproxy.config import is_host_name
from kilnproxy.errors import OperatorError

CA_DAYS = 3650
MAX_DAYS = 36500  # a hundred years; x509 dates end in 9999
COMMON_NAME_MAX = 64  # characters, in x509 (ub-common-name)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a directory should be, too
        raise OperatorError(f"cannot make the directory {path.parent}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise OperatorError(f"{path} exists already; not overwriting it") from None
    except OSError as exc:
        raise OperatorError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except OSError as exc:  # a full disk: no truncated file is left
        path.unlink(missing_ok=True)
        raise OperatorError(f"cannot write {path}: {exc.strerror}") from None


def _write_pair(key_path: Path, key: bytes, cert_path: Path, cert: bytes) -> None:
    """A key and its certificate, both or neither: a refusal leaves no key without its
    certificate behind (which the next attempt would refuse to overwrite in turn)."""
    for path in (key_path, cert_path):
        if os.path.lexists(path):
            raise OperatorError(f"{path} exists already; not overwriting it")
    _write_new(key_path, key, 0o600)
    try:
        _write_new(cert_path, cert, 0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def init_ca(directory: Path, name: str | None) -> list[str]:
    """DIR/ca.pem and DIR/ca.key: a CA that signs agents' and proxies' certificates.

    Without a name: "kilnproxy CA" and a random suffix (two CAs of one name are easily confused)."""
    name = name or f"kilnproxy CA {secrets.token_hex(4)}"
    if not name.isprintable():
        raise OperatorError(f"--name {name!r} must be printable")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    try:
        subject = _name(name)
    except ValueError as exc:  # longer than a common name's 64 characters
        raise OperatorError(f"cannot name a CA {name!r}: {exc}") from None
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write_pair(directory / "ca.key", _key_pem(key), directory / "ca.pem", cert_pem)
    return [f"CA {name!r}: {directory / 'ca.pem'} (key {directory / 'ca.key'})"]


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except OSError as exc:
        raise OperatorError(f"cannot read the CA in {directory}: {exc.strerror}") from None
    except ValueError as exc:
        raise OperatorError(f"the CA in {directory} is not readable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise OperatorError(f"the CA key in {directory} is not an ECDSA key")
    if key.public_key() != cert.public_key():  # what it signed would verify against no CA
        raise OperatorError(f"ca.key in {directory} is not the key of ca.pem")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise OperatorError(f"ca.pem in {directory} is not a CA certificate")
    return cert, key


def _subject_names(names: list[str]) -> list[x509.GeneralName]:
    """An agent's names as its backend URLs write them: addresses, or host names (which TLS
    compares with the URL's host; a name no URL can hold would make a certificate for none)."""
    out: list[x509.GeneralName] = []
    for item in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        if not is_host_name(item):
            raise ValueError(f"{item!r} is neither a host name nor an IP address")
        out.append(x509.DNSName(item))
    return out


def issue(ca_dir: Path, kind: str, names: list[str], out: Path, days: int) -> list[str]:
    """OUT.pem and OUT.key: an agent's server certificate for `names` (host names or
    addresses, as the backend URLs write them), or a proxy's client certificate."""
    if not 1 <= days <= MAX_DAYS:
        raise OperatorError(f"--days must be 1 to {MAX_DAYS}, not {days}")
    for name in names:
        if not name.isprintable():  # a common name on two lines, in every log that shows it
            raise OperatorError(f"--name {name!r} must be printable")
    if kind == "proxy" and len(names) > 1:  # its certificate names one proxy, in its CN
        raise OperatorError(f"a proxy's certificate has one name, not {len(names)}")
    if not out.name or out.name in (".", ".."):
        raise OperatorError(f"OUT must name the files to write (OUT.pem, OUT.key), not {out}")
    cert_path, key_path = out.with_name(out.name + ".pem"), out.with_name(out.name + ".key")
    ca_cert, ca_key = _load_ca(ca_dir)
    try:
        cert, key = _sign(ca_cert, ca_key, kind, names, days)
    except (ValueError, OverflowError) as exc:  # a name x509 cannot carry; days past year 9999
        raise OperatorError(f"cannot issue a certificate for {', '.join(names)}: {exc}") from None
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write_pair(key_path, _key_pem(key), cert_path, cert_pem)
    return [f"{kind} certificate for {', '.join(names)}: {cert_path} (key {key_path})"]


def _common_name(kind: str, name: str) -> str:
    """The subject's common name: `name`, or for an agent's host name longer than a common name
    may be (64), its first label. Clients check an agent's names in its subjectAltName, which
    carries every name whole."""
    if kind == "agent" and len(name) > COMMON_NAME_MAX and "." in name:
        return name.split(".", 1)[0]
    return name


def _sign(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    kind: str,
    names: list[str],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The certificate, signed by the CA, and its new key."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "agent" else ExtendedKeyUsageOID.CLIENT_AUTH
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(_common_name(kind, names[0])))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        # Names the CA's key, so a bundle of several CAs of the same name still finds the right one.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if kind == "agent":
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_subject_names(names)), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key
