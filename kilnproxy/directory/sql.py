"""Every statement the directory runs after its schema exists, written once for both stores.

Rule: one text per statement, in the SQL that SQLite and PostgreSQL both speak, with `:name`
parameters (SQLite's own style; `to_pyformat` makes psycopg's `%(name)s` of them). A statement
that cannot be written the same way for both does not belong here but in a migration. Rule 2:
each lookup of the SSH path is ONE statement, so that it costs one round trip to PostgreSQL.

An optional filter is `CAST(:x AS TEXT) IS NULL OR col = :x`: PostgreSQL cannot infer the type of
a bare NULL parameter, and SQLite reads the cast as a no-op. Ordering is byte order in both:
SQLite's BINARY collation, and the "C" collation of every name column in PostgreSQL's schema.
"""

from __future__ import annotations

import functools
import re

# -- the two lookups of the SSH path (SPEC 2) ------------------------------------------------------

IDENTITY = """
SELECT a.name, u.name, u.role, k.name FROM keys k
JOIN users u ON u.id = k.user_id JOIN accounts a ON a.id = u.account_id
WHERE k.fingerprint = :fingerprint"""

# The route, and who the asking key belongs to now with their grant on it, together: one round
# trip. No row: the key was removed since the connection logged in. A row of NULL route: no
# such repository.
ROUTE = """
SELECT rr.vcs, rr.backend, rr.url, rr.path,
    (SELECT g.access FROM grants g WHERE g.repo_id = rr.id AND g.user_id = k.user_id),
    ua.name, u.role
FROM keys k JOIN users u ON u.id = k.user_id JOIN accounts ua ON ua.id = u.account_id
LEFT JOIN (
    SELECT r.id, r.vcs, r.backend, b.url, r.path
    FROM repos r JOIN accounts a ON a.id = r.account_id JOIN backends b ON b.name = r.backend
    WHERE a.name = :account AND r.name = :name
) rr ON TRUE
WHERE k.fingerprint = :fingerprint"""

# -- admin reads -----------------------------------------------------------------------------------

ACCOUNT_ID = "SELECT id FROM accounts WHERE name = :account"

USER_ID = """
SELECT u.id FROM users u JOIN accounts a ON a.id = u.account_id
WHERE a.name = :account AND u.name = :user"""

REPO_ID = """
SELECT r.id FROM repos r JOIN accounts a ON a.id = r.account_id
WHERE a.name = :account AND r.name = :name"""

KEY_OWNER = """
SELECT a.name || '/' || u.name FROM keys k JOIN users u ON u.id = k.user_id
JOIN accounts a ON a.id = u.account_id WHERE k.fingerprint = :fingerprint"""

KEYS = """
SELECT k.fingerprint, a.name, u.name, k.name, k.algorithm, k.created_at FROM keys k
JOIN users u ON u.id = k.user_id JOIN accounts a ON a.id = u.account_id
WHERE (CAST(:account AS TEXT) IS NULL OR a.name = :account)
  AND (CAST(:user AS TEXT) IS NULL OR u.name = :user)
ORDER BY a.name, u.name, k.created_at"""

BACKENDS = "SELECT name, url FROM backends ORDER BY name"

BACKEND_URL = "SELECT url FROM backends WHERE name = :name"

REPOS = """
SELECT a.name || '/' || r.name, r.vcs, r.backend, b.url, r.path FROM repos r
JOIN accounts a ON a.id = r.account_id JOIN backends b ON b.name = r.backend
WHERE CAST(:account AS TEXT) IS NULL OR a.name = :account
ORDER BY 1"""

# -- admin writes ----------------------------------------------------------------------------------

ADD_ACCOUNT = "INSERT INTO accounts (name, created_at) VALUES (:account, :now)"

ADD_USER = """
INSERT INTO users (account_id, name, role, created_at) VALUES (:account_id, :user, :role, :now)"""

ADD_KEY = """
INSERT INTO keys (fingerprint, user_id, name, algorithm, public_key, created_at)
VALUES (:fingerprint, :user_id, :name, :algorithm, :public_key, :now)"""

REMOVE_KEY = "DELETE FROM keys WHERE fingerprint = :fingerprint"

ADD_BACKEND = "INSERT INTO backends (name, url, created_at) VALUES (:name, :url, :now)"

ADD_REPO = """
INSERT INTO repos (account_id, name, vcs, backend, path, created_at)
VALUES (:account_id, :name, :vcs, :backend, :path, :now)"""

GRANT = """
INSERT INTO grants (user_id, repo_id, access) VALUES (:user_id, :repo_id, :access)
ON CONFLICT (user_id, repo_id) DO UPDATE SET access = excluded.access"""

_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.cache  # a handful of constant statements
def to_pyformat(sql: str) -> str:
    """`:name` to psycopg's `%(name)s`. The statements here hold no `%` and no `::` cast."""
    if "%" in sql:
        raise ValueError("a shared statement must not contain %")
    return _PARAMETER.sub(r"%(\1)s", sql)
