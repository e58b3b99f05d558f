"""The signature policy of SPEC 3: no SHA-1 anywhere, no dsa."""

from __future__ import annotations

import asyncssh

# Client signature algorithms accepted for public key auth: no SHA-1 (`ssh-rsa`), no dsa.
SIGNATURE_ALGS = [
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
]
ALLOWED_SIGNATURES = frozenset(alg.encode() for alg in SIGNATURE_ALGS)


def restrict_signatures(key: asyncssh.SSHKey) -> None:
    """Make `key` verify only the signature algorithms of our policy (no `ssh-rsa`, SHA-1).

    asyncssh's SSHKey.verify() accepts every algorithm the key type supports, whatever
    `signature_algs` says (that option only shapes the server-sig-algs advertisement), so the
    narrowing is applied to the key object that asyncssh verifies the client's signature with.
    """
    key.all_sig_algorithms = set(key.all_sig_algorithms) & ALLOWED_SIGNATURES
