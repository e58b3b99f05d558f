"""OpenSSH public keys: parsing, fingerprints, and the key policy of SPEC 2.

Accepted: ed25519, ecdsa, rsa of 2048 to 16384 bits (and their security-key variants). Never
dsa.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import asyncssh
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from kilnproxy.directory.model import PublicKey
from kilnproxy.errors import OperatorError

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384  # OpenSSH's own limit: a larger key costs every login its verification
_ALLOWED = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-rsa",
)


def policy_problem(key: asyncssh.SSHKey) -> str | None:
    """Why this key may not be used, or None if it may."""
    algorithm = key.algorithm.decode("ascii")
    if algorithm not in _ALLOWED:
        return f"{algorithm} keys are not accepted (use ed25519, ecdsa or rsa >= {MIN_RSA_BITS})"
    if algorithm == "ssh-rsa":
        public = load_der_public_key(key.export_public_key("pkcs8-der"))
        assert isinstance(public, rsa.RSAPublicKey)
        if public.key_size < MIN_RSA_BITS:
            return f"rsa key of {public.key_size} bits is too small (at least {MIN_RSA_BITS})"
        if public.key_size > MAX_RSA_BITS:
            return f"rsa key of {public.key_size} bits is too large (at most {MAX_RSA_BITS})"
    return None


RFC4716_BEGIN = "---- BEGIN SSH2 PUBLIC KEY ----"
RFC4716_END = "---- END SSH2 PUBLIC KEY ----"
# What a private key file holds: OpenSSH's and PEM's armour, RFC 4716's, PuTTY's .ppk.
PRIVATE_KEY_MARKS = ("PRIVATE KEY-----", "PRIVATE KEY ----", "PuTTY-User-Key-File-")
# A key type, then its base64 (every SSH key blob starts with the length of its type: AAAA),
# after something else: authorized_keys options before the key.
_AFTER_OPTIONS = re.compile(r"(.*?)\s+(?:ssh|ecdsa|sk)-\S+\s+AAAA")


def parse_public_key(text: str) -> PublicKey:
    """Parse one public key: an OpenSSH line (as in id_ed25519.pub), or the RFC 4716 block that
    `ssh-keygen -e` and PuTTYgen write. Raise OperatorError if it is not an acceptable key."""
    blob = key_text(text)
    try:
        key = asyncssh.import_public_key(blob)
    except (asyncssh.KeyImportError, ValueError) as exc:
        if blob.startswith(RFC4716_BEGIN):
            raise OperatorError(f"not an RFC 4716 public key: {exc}") from None
        options = _AFTER_OPTIONS.match(blob)
        if options:
            raise OperatorError(
                f"the key comes after authorized_keys options ({shorten(options.group(1))}): "
                "give the key alone, as ssh-keygen wrote it"
            ) from None
        raise OperatorError(f"not an OpenSSH public key: {exc}") from None
    problem = policy_problem(key)
    if problem:
        raise OperatorError(problem)
    openssh = key.export_public_key("openssh").decode("ascii").split()
    return PublicKey(key.algorithm.decode("ascii"), fingerprint(key), " ".join(openssh[:2]))


def key_text(text: str) -> str:
    """The one key in `text`: an RFC 4716 block whole, else its one non-empty line. asyncssh
    would take the first of several keys and pass over the rest: one is all there may be."""
    if any(mark in text for mark in PRIVATE_KEY_MARKS):
        raise OperatorError("this is a private key: give the public one (its .pub file)")
    text = text.removeprefix("\ufeff").strip()  # a byte order mark: saved by Windows' Notepad
    blocks = text.count(RFC4716_BEGIN)
    if blocks == 1 and text.startswith(RFC4716_BEGIN) and text.endswith(RFC4716_END):
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise OperatorError("no public key given (the input is empty)")
    if blocks or len(lines) > 1:
        what = (f"{blocks} RFC 4716 blocks" if blocks > 1 else
                "an RFC 4716 block and more" if blocks else f"{len(lines)} lines")  # fmt: skip
        raise OperatorError(f"expected one public key, got {what}: add each key on its own")
    return lines[0]


def shorten(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def fingerprint(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


def write_new_key(path: Path, comment: str) -> asyncssh.SSHKey:
    """Generate an ed25519 key pair: the private half at `path` (mode 0600), `path`.pub beside."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OperatorError(f"cannot write a new key to {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key.export_private_key())
        path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    except OSError as exc:  # no half of a pair left behind: the next try makes a whole one
        path.unlink(missing_ok=True)
        raise OperatorError(f"cannot write a new key to {path}: {exc.strerror or exc}") from None
    return key
