from __future__ import annotations

import pytest

from kilnproxy.policy.access import Access, Role, effective_access, required_access
from kilnproxy.policy.commands import Verb


@pytest.mark.parametrize(
    ("role", "same_account", "grant", "expected"),
    [
        (Role.READ, True, None, Access.READ),
        (Role.WRITE, True, None, Access.WRITE),
        (Role.ADMIN, True, None, Access.WRITE),
        (Role.ADMIN, False, None, Access.NONE),
        (Role.READ, False, Access.READ, Access.READ),
        (Role.READ, False, Access.WRITE, Access.WRITE),
        (Role.READ, True, Access.WRITE, Access.WRITE),
        (Role.WRITE, True, Access.READ, Access.WRITE),
    ],
)
def test_effective_access(
    role: Role, same_account: bool, grant: Access | None, expected: Access
) -> None:
    repo_account = "aviato" if same_account else "hooli"
    assert effective_access("aviato", role, repo_account, grant) is expected


def test_required_access() -> None:
    assert required_access(Verb.UPLOAD_PACK) is Access.READ
    assert required_access(Verb.UPLOAD_ARCHIVE) is Access.READ
    assert required_access(Verb.HG_SERVE) is Access.READ  # hg pushes are checked by the hook
    assert required_access(Verb.RECEIVE_PACK) is Access.WRITE
