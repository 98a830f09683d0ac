"""Where a study and its runs are stored: database URLs, checks that they can be reached before
anything is trained or written, Optuna's RDB storage, and the lock all workers of a study share.
"""
from __future__ import annotations

import os
import time
import zlib
from typing import Any

import optuna

from .errors import UserError


def default_storage_url(out: str) -> str:
    """The study's SQLite database under the output folder."""
    return f"sqlite:///{os.path.abspath(os.path.join(out, 'optuna.db'))}"


def default_tracking_uri(out: str) -> str:
    """A local SQLite MLflow store under the output folder (`mlflow ui --backend-store-uri` opens it)."""
    return f"sqlite:///{os.path.abspath(os.path.join(out, 'mlflow.db'))}"


class StudyLock:
    """A lock shared by every worker of one study, held only while a trial is claimed."""

    def __init__(self, storage_url: str, study: str) -> None:
        from sqlalchemy.engine import make_url

        url = make_url(storage_url)
        self.kind, self.held, self.conn, self.fd = url.get_backend_name(), False, None, None
        self.key = zlib.crc32(f"autocompress:{study}".encode()) & 0x7FFFFFFF
        if self.kind == "sqlite" and url.database and url.database != ":memory:":
            self.path: str | None = f"{url.database}.{self.key}.lock"
        else:
            self.path = None
        self.url = storage_url

    def acquire(self) -> None:
        if self.held:
            return
        if self.kind == "postgresql":
            if self.conn is None:
                import sqlalchemy

                engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
                self.conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self.conn.exec_driver_sql(f"SELECT pg_advisory_lock({self.key})")
        elif self.path is not None:
            import fcntl

            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.kind == "postgresql" and self.conn is not None:
            self.conn.exec_driver_sql(f"SELECT pg_advisory_unlock({self.key})")
        elif self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        if self.conn is not None:
            self.conn.close()
        if self.fd is not None:
            os.close(self.fd)
        self.conn = self.fd = None


_FAST_SQLITE = False


def fast_sqlite() -> None:
    """Open every SQLite store of this process (the study's and MLflow's) in WAL mode with
    synchronous=NORMAL. A commit then survives a crash or kill of the process, though not a power
    cut, and costs about 2.5 ms here instead of 23 ms (no fsync per commit). A trial makes about
    40 commits (its parameters, attributes, metrics and tags), so this is most of the per-trial
    overhead of a search. WAL needs a local file system, which SQLite needs for locking anyway."""
    global _FAST_SQLITE
    if _FAST_SQLITE:
        return
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            cur = dbapi_conn.cursor()
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error:  # e.g. busy switching modes: the defaults still work
                pass
            finally:
                cur.close()

    _FAST_SQLITE = True


def rdb_storage(url: str, attempts: int = 5, **kwargs: Any) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; retried a few times because workers starting together on an empty
    database may race to create its tables (one of them gets an IntegrityError)."""
    fast_sqlite()
    for i in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:
            if i == attempts - 1 or "IntegrityError" not in type(e).__name__ + str(e):
                raise
            time.sleep(0.5 + i)
    raise AssertionError("unreachable")


def database_url(url: str | None) -> str | None:
    """`postgresql://` names SQLAlchemy's default driver (psycopg 3 since SQLAlchemy 2.1): use psycopg2
    (the `postgres` extra) when only that one is installed. Other URLs are returned as they are."""
    if not url or not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def check_storage(url: str | None, what: str = "study storage") -> None:
    """Fail fast, before any training or file, on a storage URL that cannot be reached (UserError)."""
    if not url:
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise UserError(f"cannot parse {what} URL {url!r}: use e.g. postgresql://user:pw@host/db "
                        "or sqlite:///path/optuna.db") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        folder = os.path.dirname(os.path.abspath(parsed.database or "")) if parsed.database else None
        if folder and not os.path.isdir(folder):
            raise UserError(f"{what} {shown}: folder {folder} does not exist")
        return
    args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool, connect_args=args)
        with engine.connect():
            pass
    except ModuleNotFoundError as e:
        raise UserError(f"{what} {shown} needs the {e.name} driver: pip install 'autocompress[postgres]'") from None
    except Exception as e:
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot reach {what} {shown}: {first}") from None


def check_tracking(uri: str | None) -> None:
    """An MLflow server URI must answer /health; a database URI must connect."""
    if not uri:
        return
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except Exception as e:
            raise UserError(f"cannot reach MLflow tracking server {uri}: {e}") from None
    elif "://" in uri and not uri.startswith(("file:", "databricks")):
        check_storage(uri, "MLflow tracking store")
