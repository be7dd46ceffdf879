"""Dashboard users: names, roles and argon2 password hashes in ``<data_dir>/users.sqlite``.

Kept apart from the node's index so that a copy of the index (for support) never carries
credentials, and so that ``radnode users add`` works whether or not the node runs.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

USERS_DB = "users.sqlite"
#: Roles from least to most trusted: viewers read, operators retry/cancel jobs,
#: reviewers may also approve contours (the review gate).
ROLES = ("viewer", "operator", "reviewer")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    REAL NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0
)
"""


class UserError(ValueError):
    """A user name, role or password the store refuses (the message says which rule)."""


@dataclass(frozen=True)
class User:
    """A logged-in (or stored) dashboard user."""

    name: str
    role: str

    def has_role(self, needed: str) -> bool:
        """Whether this user's role is ``needed`` or a more trusted one."""
        return ROLES.index(self.role) >= ROLES.index(needed)


class UserStore:
    """The users table; each call opens its own connection (the web server is multi-threaded)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / USERS_DB
        self._hasher = PasswordHasher()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute(_SCHEMA)
        self.path.chmod(0o600)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def add(self, name: str, role: str, password: str, *, replace: bool = False) -> User:
        """Store a user (``replace`` sets a new role/password for an existing name)."""
        if not NAME_PATTERN.match(name):
            raise UserError(f"user name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ -")
        if role not in ROLES:
            raise UserError(f"role {role!r} unknown; allowed: {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        try:
            with self._connect() as conn:
                conn.execute(
                    f"{verb} INTO users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                    (name, role, self._hasher.hash(password), time.time()),
                )
        except sqlite3.IntegrityError:
            raise UserError(f"user {name!r} exists (use --replace to change role or password)") from None
        return User(name, role)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when the password matches, else ``None`` (unknown names cost a hash too)."""
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM users WHERE name = ? AND disabled = 0", (name,)).fetchone()
        stored = row["password_hash"] if row else self._hasher.hash("timing-equaliser")
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return User(row["name"], row["role"]) if row else None

    def get(self, name: str) -> User | None:
        """The enabled user called ``name`` (sessions are re-checked against it on every request)."""
        with self._connect() as conn:
            row = conn.execute("SELECT name, role FROM users WHERE name = ? AND disabled = 0", (name,)).fetchone()
        return User(row["name"], row["role"]) if row else None

    def list(self) -> list[User]:
        with self._connect() as conn:
            return [User(r["name"], r["role"]) for r in conn.execute("SELECT name, role FROM users ORDER BY name")]
