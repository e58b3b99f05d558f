"""The SSH algorithm names the asyncssh that constraints.txt pins knows (its get_kex_algs,
get_encryption_algs and get_mac_algs: tests/unit/test_config.py holds them equal), so that the
configuration is checked where it is read, by the master too, which never imports asyncssh: a
HUP with a mistyped name is refused and changes nothing, instead of replacing no worker."""

from __future__ import annotations

# Key exchange.
KEX = frozenset(
    {
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "curve448-sha512",
        "diffie-hellman-group-exchange-sha1",
        "diffie-hellman-group-exchange-sha224@ssh.com",
        "diffie-hellman-group-exchange-sha256",
        "diffie-hellman-group-exchange-sha384@ssh.com",
        "diffie-hellman-group-exchange-sha512@ssh.com",
        "diffie-hellman-group1-sha1",
        "diffie-hellman-group14-sha1",
        "diffie-hellman-group14-sha224@ssh.com",
        "diffie-hellman-group14-sha256",
        "diffie-hellman-group14-sha256@ssh.com",
        "diffie-hellman-group15-sha256@ssh.com",
        "diffie-hellman-group15-sha384@ssh.com",
        "diffie-hellman-group15-sha512",
        "diffie-hellman-group16-sha384@ssh.com",
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group16-sha512@ssh.com",
        "diffie-hellman-group17-sha512",
        "diffie-hellman-group18-sha512",
        "diffie-hellman-group18-sha512@ssh.com",
        "ecdh-sha2-1.3.132.0.10",
        "ecdh-sha2-nistp256",
        "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521",
        "gss-1.3.132.0.10-sha256",
        "gss-curve25519-sha256",
        "gss-curve448-sha512",
        "gss-gex-sha1",
        "gss-gex-sha256",
        "gss-group1-sha1",
        "gss-group14-sha1",
        "gss-group14-sha256",
        "gss-group15-sha512",
        "gss-group16-sha512",
        "gss-group17-sha512",
        "gss-group18-sha512",
        "gss-nistp256-sha256",
        "gss-nistp384-sha384",
        "gss-nistp521-sha512",
        "mlkem1024nistp384-sha384",
        "mlkem768nistp256-sha256",
        "mlkem768x25519-sha256",
        "rsa1024-sha1",
        "rsa2048-sha256",
    }
)

# Ciphers.
CIPHERS = frozenset(
    {
        "3des-cbc",
        "aes128-cbc",
        "aes128-ctr",
        "aes128-gcm@openssh.com",
        "aes192-cbc",
        "aes192-ctr",
        "aes256-cbc",
        "aes256-ctr",
        "aes256-gcm@openssh.com",
        "arcfour",
        "arcfour128",
        "arcfour256",
        "blowfish-cbc",
        "cast128-cbc",
        "chacha20-poly1305@openssh.com",
        "seed-cbc@ssh.com",
    }
)

# MACs.
MACS = frozenset(
    {
        "hmac-md5",
        "hmac-md5-96",
        "hmac-md5-96-etm@openssh.com",
        "hmac-md5-etm@openssh.com",
        "hmac-sha1",
        "hmac-sha1-96",
        "hmac-sha1-96-etm@openssh.com",
        "hmac-sha1-etm@openssh.com",
        "hmac-sha2-256",
        "hmac-sha2-256-96",
        "hmac-sha2-256-96-etm@openssh.com",
        "hmac-sha2-256-etm@openssh.com",
        "hmac-sha2-512",
        "hmac-sha2-512-96",
        "hmac-sha2-512-96-etm@openssh.com",
        "hmac-sha2-512-etm@openssh.com",
        "hmac-sha224@ssh.com",
        "hmac-sha256-2@ssh.com",
        "hmac-sha256@ssh.com",
        "hmac-sha384@ssh.com",
        "hmac-sha512@ssh.com",
        "umac-128-etm@openssh.com",
        "umac-128@openssh.com",
        "umac-64-etm@openssh.com",
        "umac-64@openssh.com",
    }
)
