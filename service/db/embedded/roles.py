"""The app role and its database: the service never connects as the superuser.

What it guarantees, at every start (it is idempotent, and runs under the start lock):

* The role ``chat`` exists, can log in with the password from ``data_dir/app-password``, and is
  no superuser and cannot create roles or databases or bypass row-level security.
* It owns the service's database, so its ``public`` schema: the migrations run as it.
* A cluster made by an older version, whose database and objects in ``public`` the superuser
  owns (it migrated as the superuser), is handed over to ``chat``: the database, and its tables,
  views, sequences, routines, enums and domains.
"""

from __future__ import annotations

import contextlib
import logging
import time

import asyncpg

from service.db.embedded.blocking import run

log = logging.getLogger(__name__)

APP_ROLE = "chat"
"""The role the service connects as: owns the database, no superuser."""

_RIGHTS = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"

_ADOPT_PUBLIC_OBJECTS = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS obj, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relowner <> '$role'::regrole
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
          AND NOT EXISTS (  -- identity and serial sequences follow their table
              SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
              AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO $role', CASE r.relkind
            WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
            WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, r.obj);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS obj FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.proowner <> '$role'::regrole
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO $role', r.obj);
    END LOOP;
    FOR r IN
        SELECT t.oid::regtype AS obj FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typowner <> '$role'::regrole AND t.typtype IN ('e', 'd')
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO $role', r.obj);
    END LOOP;
END $$
"""
"""Hands what the superuser made in ``public`` (an older version migrated as it) to the app role."""


def provision(
    *, admin_url: str, superuser_url: str, database: str, password: str, deadline: float
) -> None:
    """Make the app role own ``database`` and everything in its ``public`` schema.

    ``admin_url`` is the superuser's URL for the ``postgres`` database, ``superuser_url`` its
    URL for ``database``; ``password`` must be URL-safe base64 (utility statements take no
    parameters, so it is written into the SQL).
    """
    role = _quote_ident(APP_ROLE)

    async def setup() -> None:
        timeout = max(deadline - time.monotonic(), 2)
        conn = await asyncpg.connect(admin_url, timeout=timeout)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE):
                log.info("creating the role %r", APP_ROLE)
                with contextlib.suppress(asyncpg.DuplicateObjectError):
                    await conn.execute(f"CREATE ROLE {role}")
            await conn.execute(f"ALTER ROLE {role} WITH {_RIGHTS} PASSWORD '{password}'")
            owner = await conn.fetchval(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
                database,
            )
            if owner is None:
                log.info("creating database %r", database)
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f"CREATE DATABASE {_quote_ident(database)} OWNER {role}")
            elif owner != APP_ROLE:
                log.warning("handing database %r over to the role %r", database, APP_ROLE)
                await conn.execute(f"ALTER DATABASE {_quote_ident(database)} OWNER TO {role}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(superuser_url, timeout=max(deadline - time.monotonic(), 2))
        try:
            await conn.execute(_ADOPT_PUBLIC_OBJECTS.replace("$role", role))
        finally:
            await conn.close()

    run(setup)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
