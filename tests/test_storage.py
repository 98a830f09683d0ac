"""Storage URLs are checked before anything is trained or written; the study lock excludes."""
from __future__ import annotations

import threading
import time

import pytest

from autocompress.errors import UserError
from autocompress.storage import StudyLock, check_storage, check_tracking, database_url, default_storage_url


def test_default_storage_is_sqlite_under_out(tmp_path):
    assert default_storage_url(str(tmp_path)) == f"sqlite:///{tmp_path}/optuna.db"


def test_database_url_leaves_other_urls_alone():
    assert database_url(None) is None
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
    assert database_url("postgresql://u@h/db").endswith("://u@h/db")


@pytest.mark.parametrize("url,needle", [("no url at all", "cannot parse"),
                                        ("sqlite:////nonexistent/dir/optuna.db", "does not exist"),
                                        ("postgresql://nobody@127.0.0.1:1/x", "cannot reach")])
def test_bad_storage_is_one_user_error_line(url, needle):
    with pytest.raises(UserError) as e:
        check_storage(database_url(url))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unreachable_tracking_server_is_a_user_error():
    with pytest.raises(UserError, match="cannot reach MLflow tracking server"):
        check_tracking("http://127.0.0.1:1")
    check_tracking(None)


def test_sqlite_study_lock_excludes_a_second_holder(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    first, second = StudyLock(url, "s"), StudyLock(url, "s")
    order: list[str] = []
    first.acquire()

    def take() -> None:
        second.acquire()
        order.append("second")
        second.release()

    t = threading.Thread(target=take)
    t.start()
    time.sleep(0.3)
    order.append("first releases")
    first.release()
    t.join(5)
    assert order == ["first releases", "second"]
    first.close()
    second.close()


def test_sqlite_stores_open_in_wal_mode_and_keep_a_killed_writers_commits(tmp_path):
    """The study's SQLite store runs in WAL mode (a commit without an fsync); what a process
    committed before it was killed is still there for the next one."""
    import sqlite3
    import subprocess
    import sys

    url = default_storage_url(str(tmp_path))
    code = ("import optuna, os, signal\n"
            "from autocompress.storage import rdb_storage\n"
            f"s = optuna.create_study(study_name='w', storage=rdb_storage({url!r}))\n"
            "t = s.ask(); t.set_user_attr('kept', 1)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], check=False)
    db = str(tmp_path / "optuna.db")
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    import optuna

    from autocompress.storage import rdb_storage

    study = optuna.load_study(study_name="w", storage=rdb_storage(url))
    assert study.trials[0].user_attrs == {"kept": 1}
