"""The history-heavy bench repository: many commits of source-like text, each a small change.

The blob-heavy `large` repository costs bytes; a real project's clone costs history: hundreds of
thousands of small objects to count, delta-compress and index. This module owns that second kind:
a deterministic git fast-import stream (a pure generator over one seeded `random.Random`, fixed
names and dates, so the same arguments always give the same commit ids) and the thin shell that
feeds it to git and repacks the result the way a hosting server's maintenance does.

It must never read the clock, the environment or anything but its arguments while generating.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEED = 20261129
EPOCH = 1_600_000_000
AUTHORS = ("Ada Byron <ada@example.com>", "Brian Kern <bwk@example.com>",
           "Grace Hopper <grace@example.com>", "Ken Thompson <ken@example.com>",
           "Linus Tor <linus@example.com>", "Margaret Ham <margaret@example.com>")  # fmt: skip
SYLLABLES = ("ba", "ce", "di", "fo", "gu", "ha", "ji", "ko", "lu", "me", "no", "pi",
             "qua", "ro", "su", "ti", "ve", "wo", "xi", "ya", "ze", "st", "tr", "nd")  # fmt: skip
STATEMENTS = (
    "{i}{a} = {b}({c}, {n})",
    "{i}{a}.{b} = {c}.{d}({n})",
    "{i}if {a} > {n} and {b} is not None:",
    "{i}for {a} in {b}.{c}({d}):",
    "{i}return {a}({b}, {c}={n})",
    "{i}# {w} {x} {y} {z} {a} {b}",
    "{i}{a}.{b}({c}, {d}, timeout={n})",
    '{i}raise {A}Error(f"{w} {x} {{{a}}} {y}")',
    "{i}def {a}_{b}(self, {c}: {A}, {d}: int = {n}) -> {B}:",
    "{i}while {a} < {n}:",
    "{i}{a} += {b}[{n}] * {c}",
)


@dataclass(frozen=True)
class Shape:
    """How much history: `commits` commits over `files` files, each commit editing a few."""

    commits: int
    files: int = 300
    packages: int = 20


class Source:
    """Pseudo-code lines, identifiers drawn from a fixed vocabulary as real code repeats them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(2, 4)))
                             for _ in range(1500)})  # fmt: skip

    def line(self) -> str:
        rng, words = self.rng, self.words
        w = rng.sample(words, 8)
        return rng.choice(STATEMENTS).format(
            i="    " * rng.randint(0, 3), a=w[0], b=w[1], c=w[2], d=w[3], w=w[4], x=w[5],
            y=w[6], z=w[7], A=w[0].title(), B=w[1].title(), n=rng.randint(0, 99_999),
        )  # fmt: skip

    def lines(self, count: int) -> list[str]:
        return [self.line() for _ in range(count)]

    def message(self, n: int) -> str:
        """A subject and a paragraph or two, as a real commit message has."""
        rng = self.rng
        subject = " ".join(rng.sample(self.words, rng.randint(3, 8))).capitalize()
        paragraphs = [
            " ".join(rng.choices(self.words, k=rng.randint(15, 60)))
            for _ in range(rng.randint(0, 2))
        ]
        return "\n\n".join([f"{subject} (#{n})", *paragraphs]) + "\n"


def edit(rng: random.Random, source: Source, lines: list[str]) -> None:
    """One to three hunks, each replacing a few lines with up to eight new ones. Removals
    balance insertions so that files hover around 100-250 lines over any length of history
    (growing files would make a long history's deltas, and its repack, ever more costly)."""
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(lines) + 1)
        size = len(lines)
        removed = rng.randint(0, 3) if size < 100 else rng.randint(1, 8) if size < 250 else 10
        lines[at : at + removed] = source.lines(rng.randint(1, 8))


def paths(rng: random.Random, source: Source, shape: Shape) -> list[str]:
    """`shape.files` module paths under `shape.packages` packages."""
    packages = rng.sample(source.words, shape.packages)
    modules = rng.sample(source.words, shape.files)
    return [f"src/{packages[k % shape.packages]}/{m}.py" for k, m in enumerate(modules)]


def blob(path: str, lines: list[str]) -> bytes:
    data = ("\n".join(lines) + "\n").encode()
    return b"M 100644 inline %s\ndata %d\n%s\n" % (path.encode(), len(data), data)


def commit(n: int, author: str, message: str, blobs: list[bytes]) -> bytes:
    data = message.encode()
    stamp = f"{author} {EPOCH + 600 * n} +0000".encode()
    parent = b"from :%d\n" % (n - 1) if n > 1 else b""
    return (b"commit refs/heads/main\nmark :%d\nauthor %s\ncommitter %s\ndata %d\n%s%s"
            % (n, stamp, stamp, len(data), data, parent) + b"".join(blobs) + b"\n")  # fmt: skip


def stream(shape: Shape, seed: int = SEED) -> Iterator[bytes]:
    """The fast-import stream, one commit at a time: every file in the first commit, then
    2 to 5 files edited in each of the others."""
    rng = random.Random(seed)
    source = Source(rng)
    names = paths(rng, source, shape)
    files = {name: source.lines(rng.randint(60, 200)) for name in names}
    yield commit(1, AUTHORS[0], "Initial import\n", [blob(p, files[p]) for p in names])
    for n in range(2, shape.commits + 1):
        changed = sorted(rng.sample(names, rng.randint(2, 5)))
        for name in changed:
            edit(rng, source, files[name])
        message = source.message(n)
        yield commit(n, rng.choice(AUTHORS), message, [blob(p, files[p]) for p in changed])


def history_repo(path: Path, shape: Shape) -> int:
    """A bare repository of `shape`'s history, repacked with deltas along each file's history
    and a reachability bitmap, as a hosting server keeps its repositories; returns its pack
    size."""
    git = ["git", "--git-dir", str(path)]
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(path)],
                   check=True)  # fmt: skip
    importer = subprocess.Popen([*git, "fast-import", "--quiet"], stdin=subprocess.PIPE)
    assert importer.stdin is not None
    for chunk in stream(shape):
        importer.stdin.write(chunk)
    importer.stdin.close()
    if importer.wait(timeout=900) != 0:
        raise RuntimeError(f"git fast-import into {path} failed")
    # fast-import deltas each blob against the one before it in the stream (another file):
    # -f finds each file's previous version instead, as `git gc` does.
    subprocess.run([*git, "repack", "-q", "-a", "-d", "-f", "--depth=50", "--window=10",
                    "--write-bitmap-index"], check=True)  # fmt: skip
    return sum(p.stat().st_size for p in path.glob("objects/pack/*.pack"))
