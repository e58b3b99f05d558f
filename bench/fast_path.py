"""The fast path's micro-benchmark: stock asyncssh against kilnproxy/ssh/fast_path.py, in one
run, as ratios (the machine's speed cancels out; its noise does not: read several rounds).

1. The cipher objects, with timeit: encrypt one packet, and decrypt it as _recv_packet does,
   for a full 32 KiB channel data packet and a 64-byte one (a window adjust, an exit status).
2. A loopback transfer through two `kilnproxy serve`, fast path on and off, taking turns: the
   worker's CPU seconds for SIZE MiB each way with a stock OpenSSH client, whose local backend
   `git` is `cat` (sending) or `sha256sum` (receiving), so the proxy's SSH leg is all there is.

    python bench/fast_path.py [--mib 200] [--rounds 3] [--ciphers LIST]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from asyncssh.encryption import Encryption, get_encryption, get_encryption_params
from harness import Kiln
from measure import cpu_seconds

from kilnproxy.policy.access import Role
from kilnproxy.ssh import fast_path

CIPHERS = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
FAKE_GIT = '#!/bin/sh\ncase "$1" in upload-pack) exec cat "$2/payload";; *) exec sha256sum;; esac\n'


def packet_round_trip(alg: str, size: int) -> Callable[[], None]:
    """One packet encrypted and decrypted, on encryption objects made by the current factory."""
    enc_alg = alg.encode()
    key_size, iv_size, block, _, mac_size, _ = get_encryption_params(enc_alg)
    key, iv = os.urandom(key_size), os.urandom(iv_size)
    sender: Encryption = get_encryption(enc_alg, key, iv)
    receiver: Encryption = get_encryption(enc_alg, key, iv)
    header, packet = size.to_bytes(4, "big"), bytes([4]) + os.urandom(size - 1)
    block = max(8, block)
    seq = [0]

    def once() -> None:
        wire = b"".join(sender.encrypt_packet(seq[0], header, packet))
        first, _ = receiver.decrypt_header(seq[0], wire[:block], 4)
        rest, mac = wire[block : len(wire) - mac_size], wire[len(wire) - mac_size :]
        assert receiver.decrypt_packet(seq[0], first, rest, 4, mac) == packet
        seq[0] += 1

    return once


def cipher_ratios(ciphers: list[str], rounds: int) -> None:
    for alg in ciphers:
        for size in (32 * 1024 + 16, 64):
            number = 2000 if size > 64 else 20000
            seconds = {}
            for enabled in (False, True):
                fast_path.apply(enabled)
                run = packet_round_trip(alg, size)
                seconds[enabled] = min(timeit.repeat(run, number=number, repeat=rounds)) / number
            fast_path.remove()
            ratio = seconds[True] / seconds[False]
            print(f"cipher {alg:32} {size:6} B packet: fast/stock time {ratio:.2f}")


def start(root: Path, enabled: bool, ciphers: list[str], size: int) -> tuple[Kiln, Path]:
    fake = root / "bin"
    fake.mkdir(parents=True)
    (fake / "git").write_text(FAKE_GIT)
    (fake / "git").chmod(0o755)
    kiln = Kiln(root / "kiln", {"ssh": {"fast_path": enabled, "encryption_algs": ciphers}})
    key = kiln.add_user("bench", "dev", Role.WRITE)
    with (kiln.add_repo("bench/payload", "git") / "payload").open("wb") as out:
        for _ in range(size >> 20):
            out.write(os.urandom(1 << 20))
    kiln.start(env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    return kiln, key


def worker_cpu(kiln: Kiln, key: Path, cipher: str, verb: str) -> float:
    """The worker's CPU seconds for one transfer of the payload."""
    payload = kiln.home / "repos" / "bench" / "payload.git" / "payload"
    argv = [*kiln.ssh_argv(key), "-c", cipher, "-p", str(kiln.port), "git@127.0.0.1",
            f"git-{verb}-pack 'bench/payload'"]  # fmt: skip
    pid = int(kiln.worker()["pid"])
    before = cpu_seconds([pid])
    with payload.open("rb") as data:
        stdin = data if verb == "receive" else subprocess.DEVNULL
        subprocess.run(argv, env=kiln.client_env(key), stdin=stdin, stdout=subprocess.DEVNULL,
                       check=True, timeout=600)  # fmt: skip
    return cpu_seconds([pid]) - before


def transfer_ratios(ciphers: list[str], rounds: int, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-fast-path-") as tmp:
        kilns = {enabled: start(Path(tmp) / str(enabled), enabled, ciphers, size)
                 for enabled in (False, True)}  # fmt: skip
        try:
            for cipher in ciphers:
                for verb, label in (("upload", "proxy sends"), ("receive", "proxy receives")):
                    cpu: dict[bool, list[float]] = {False: [], True: []}
                    for _ in range(rounds):
                        for enabled, (kiln, key) in kilns.items():
                            cpu[enabled].append(worker_cpu(kiln, key, cipher, verb))
                    ratio = min(cpu[True]) / min(cpu[False])
                    print(f"transfer {cipher:30} {label:15}: fast/stock worker CPU {ratio:.2f}")
        finally:
            for kiln, _ in kilns.values():
                kiln.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=200, help="transfer size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ciphers", default=",".join(CIPHERS))
    args = parser.parse_args()
    ciphers = args.ciphers.split(",")
    cipher_ratios(ciphers, args.rounds)
    transfer_ratios(ciphers, args.rounds, args.mib << 20)


if __name__ == "__main__":
    main()
