"""Schema and least-privilege grants for a PostgreSQL deployment (``radnode db init``).

Three roles, created by the database administrator (docs/operations.md):

``owner``
    Owns the database and the tables; used only to create or change the schema. Never
    configured on a node or worker.
``node``
    The node (listener, completion, routing, dispatch, recovery): reads and writes rows of
    every radnode table, the outbox's included, cannot create, alter or drop any (not the
    owner, no ``CREATE`` on the schema). The audit trail is append-only for it: it may add
    and read records, never change or delete one.
``worker``
    A ``radnode worker``: claims and finishes jobs, records attempts, its registry row and
    handed-back results, reads where the node is. It cannot enqueue or delete jobs, and
    cannot change the node's registration. It has no right on the outbox tables: workers
    hand results back, only the node stages and delivers them.
"""

from __future__ import annotations

from psycopg import sql

from radnode.node.audit import AUDIT_TABLE
from radnode.node.index import POSTGRES_TABLES as INDEX_TABLES
from radnode.pipeline.database import PostgresDB
from radnode.pipeline.outbox import POSTGRES_TABLES, ROW_TABLES, create_postgres_tables

#: Tables created by the stores (job queue, shared state, outbox, series index) whose rows the node changes.
TABLES = (
    "jobs", "job_attempts", "radnode_nodes", "radnode_workers", "radnode_results",
    *(POSTGRES_TABLES[t] for t in ROW_TABLES),
    INDEX_TABLES["meta"], INDEX_TABLES["instances"], INDEX_TABLES["series"], INDEX_TABLES["completion_failures"],
)
#: Tables the node may only add rows to and read (the audit trail).
APPEND_ONLY_TABLES = (AUDIT_TABLE,)

#: Table -> privileges of the worker role.
WORKER_GRANTS: dict[str, tuple[str, ...]] = {
    "jobs": ("SELECT", "UPDATE"),
    "job_attempts": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "radnode_nodes": ("SELECT",),
    "radnode_workers": ("SELECT", "INSERT", "UPDATE"),
    "radnode_results": ("SELECT", "INSERT", "UPDATE"),
}


def init_database(owner_url: str, node_role: str | None, worker_role: str | None) -> list[str]:
    """Create every table (as the owner) and grant the node and worker roles; returns the statements run."""
    from pathlib import Path

    from radnode.node.audit import audit_store
    from radnode.node.index import NodeIndex
    from radnode.pipeline.pg_queue import PostgresJobQueue
    from radnode.pipeline.pg_shared import SharedState

    PostgresJobQueue(owner_url)
    SharedState(owner_url)
    create_postgres_tables(owner_url)
    NodeIndex(Path("radnode.sqlite"), database_url=owner_url).close()  # the path is unused on PostgreSQL
    audit_store(owner_url)
    statements: list[sql.Composable] = [sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC")]
    if node_role:
        role = sql.Identifier(node_role)
        statements += [
            sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role),
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in TABLES), role
            ),
            sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in APPEND_ONLY_TABLES), role
            ),
            sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(role),
        ]
    if worker_role:
        role = sql.Identifier(worker_role)
        statements.append(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
        for table, privileges in WORKER_GRANTS.items():
            statements.append(
                sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(", ").join(sql.SQL(p) for p in privileges), sql.Identifier(table), role)
            )
    db = PostgresDB(owner_url, "", "jobs")
    done = []
    with db.write() as conn:
        for statement in statements:
            conn.execute(statement)
            done.append(statement.as_string(conn))
    return done
