"""Dashboard accounts: users, their roles and argon2id password hashes, in the catalog.

Roles are ordered: a viewer reads, a curator also reviews, an admin also runs the trigger
policies and manages users. Every write path takes the acting user's name and checks the
role the catalog holds *now* (`require`), so removing or demoting a user takes effect on
their next action, not when their session ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from datetime import datetime, timezone

import pyarrow as pa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dataengine.catalog import Catalog
from dataengine.schema import USERS

ROLES = ("viewer", "curator", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8
_hasher = PasswordHasher()  # argon2id with the library's current parameters


class AccountError(ValueError):
    """A bad username, role or password, or an unknown user."""


class Forbidden(PermissionError):
    """The user's role does not allow the action."""


@dataclass(frozen=True)
class User:
    username: str
    role: str

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise AccountError(f"role must be one of {ROLES}, got {role!r}")


def add_user(catalog: Catalog, username: str, password: str, role: str, created_by: str = "cli",
             replace: bool = False) -> User:
    """Create a user (or, with `replace`, reset an existing one's password and role)."""
    if not _NAME.match(username or ""):
        raise AccountError(f"username {username!r}: 1-64 of letters, digits, '_', '.', '@', '-'")
    _check_role(role)
    if len(password or "") < MIN_PASSWORD:
        raise AccountError(f"password for {username!r} is shorter than {MIN_PASSWORD} characters")
    row = {"username": username, "role": role, "password_hash": _hasher.hash(password),
           "created_by": created_by, "created_at": datetime.now(timezone.utc)}
    with catalog.transaction() as con:
        exists = con.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchall()
        if exists and not replace:
            raise AccountError(f"user {username!r} exists (pass replace to reset it)")
        catalog.upsert("users", pa.Table.from_pylist([row], schema=USERS), con)
    return User(username, role)


def remove_user(catalog: Catalog, username: str) -> None:
    with catalog.transaction() as con:
        if not con.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchall():
            raise AccountError(f"no user {username!r}")
        con.execute("DELETE FROM users WHERE username = ?", [username])
        con.execute("DELETE FROM claims WHERE curator = ?", [username])  # what they held is free again


def list_users(catalog: Catalog) -> list[dict]:
    return catalog.query("SELECT username, role, created_by, created_at FROM users ORDER BY username").to_pylist()


def authenticate(catalog: Catalog, username: str, password: str) -> User | None:
    """The user when the password matches, else None (the same answer for an unknown name)."""
    rows = catalog.query("SELECT role, password_hash FROM users WHERE username = ?", [username]).to_pylist()
    if not rows:
        # Spend the same time as a real check, so a name cannot be probed by timing.
        try:
            _hasher.verify(_dummy_hash(), password or "")
        except VerificationError:
            pass
        return None
    try:
        _hasher.verify(rows[0]["password_hash"], password or "")
    except (VerificationError, InvalidHashError):
        return None
    return User(username, rows[0]["role"])


def require(catalog: Catalog, username: str | None, role: str, con=None) -> User:
    """The acting user, re-read from the catalog; Forbidden if unknown or below `role`."""
    _check_role(role)
    if not username:
        raise Forbidden("sign in first")
    sql, params = "SELECT role FROM users WHERE username = ?", [username]
    rows = con.execute(sql, params).fetchall() if con is not None else catalog.query(sql, params).to_pylist()
    if not rows:
        raise Forbidden(f"{username!r} is not a user (any more)")
    user = User(username, rows[0][0] if con is not None else rows[0]["role"])
    if not user.can(role):
        raise Forbidden(f"{username} is a {user.role}; this needs a {role}")
    return user


@cache
def _dummy_hash() -> str:
    """A hash to check unknown names against; made on first use, not at every import."""
    return _hasher.hash("not a password anyone has")
