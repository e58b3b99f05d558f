"""Access decisions: may this identity do this verb on this repository. Pure, no I/O."""

from __future__ import annotations

import enum

from kilnproxy.policy.commands import Verb


class Role(enum.Enum):
    """A user's standing over every repository of their own account."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class Access(enum.IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2

    @property
    def label(self) -> str:
        return self.name.lower()


_ROLE_ACCESS = {Role.READ: Access.READ, Role.WRITE: Access.WRITE, Role.ADMIN: Access.WRITE}


def effective_access(
    user_account: str, role: Role, repo_account: str, grant: Access | None
) -> Access:
    """The user's role covers their own account; a grant covers one repository of any account."""
    own = _ROLE_ACCESS[role] if user_account == repo_account else Access.NONE
    return max(own, grant or Access.NONE)


def required_access(verb: Verb) -> Access:
    return Access.WRITE if verb.writes else Access.READ
