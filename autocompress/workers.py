"""Several workers on one study: N processes here (`--workers N`) or the same command on N machines.

Coordination is the study's own database, nothing else: before taking a trial a worker holds a
lock of that database (a PostgreSQL advisory lock, or a file lock beside a SQLite file), counts
the trials finished or running, and asks Optuna for a trial only while that count is below
`--trials`; the lock is released as soon as the trial exists. So the study ends with exactly
`--trials` counted trials however many workers share it (a trial retried after its worker died
is counted once). Other databases get no lock: a few surplus trials are then possible.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from typing import Any, Callable

import optuna

from .errors import UserError
from .heartbeat import retried_numbers, retry_trial

TS = optuna.trial.TrialState
FINISHED = (TS.COMPLETE, TS.PRUNED, TS.FAIL)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


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


def study_counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials that count towards --trials: a failed trial that was retried is
    replaced by its retry; WAITING trials (queued, retries) are not counted until they run."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    live = [t for t in trials if t.number not in retried]
    return sum(t.state in FINISHED for t in live), sum(t.state == TS.RUNNING for t in live)


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The finished trials that count towards --trials (retried originals left out)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried and t.state in FINISHED]


def optimize_shared(study: optuna.Study, objective: Callable[[optuna.Trial], float], total: int, lock: StudyLock,
                    *, timeout: float | None = None, catch: tuple[type[Exception], ...] = (),
                    callbacks: list[Any] | None = None, poll: float = 1.0,
                    sampler_for: Callable[[int], optuna.samplers.BaseSampler] | None = None) -> int:
    """Run trials until the study holds `total` counted trials; returns how many this worker ran.

    While the count is reached but trials of other workers still run, waits: one of them may die,
    and its retry must still be run. Ctrl-C: the current trial is failed by Optuna, marked
    interrupted and queued again, then KeyboardInterrupt propagates. `sampler_for(number)`, when
    given, is the sampler that proposes that trial's parameters (so they depend on the number).
    """
    deadline = time.monotonic() + timeout if timeout else None
    current: list[int] = []

    def run(trial: optuna.Trial) -> float:
        lock.release()
        current[:] = [trial.number]
        if sampler_for is not None:
            study.sampler = sampler_for(trial.number)
        trial.set_user_attr("worker", WORKER)
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (SIGINT)")
            raise

    ran, waiting_said, stop = 0, False, []

    def on_sigint(signum: int, frame: Any) -> None:
        stop.append(signum)  # remembered even if a library swallows the KeyboardInterrupt
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        while deadline is None or time.monotonic() < deadline:
            if stop:
                raise KeyboardInterrupt
            lock.acquire()
            try:
                optuna.storages.fail_stale_trials(study)
                finished, running = study_counts(study)
                if finished + running >= total:
                    if finished >= total:
                        break
                    if not waiting_said:
                        print(f"waiting for {running} running trial(s) of other workers", flush=True)
                        waiting_said = True
                    lock.release()
                    time.sleep(poll)
                    continue
                study.optimize(run, n_trials=1, catch=catch, callbacks=callbacks, gc_after_trial=False)
                ran += 1
            finally:
                lock.release()
    except KeyboardInterrupt:
        if current:
            _requeue_interrupted(study, current[0])
        raise
    finally:
        lock.close()
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return ran


def _requeue_interrupted(study: optuna.Study, number: int) -> None:
    """Queue the interrupted trial again so the next run (or another worker) repeats it."""
    trials = study.get_trials(deepcopy=False)
    t = trials[number] if number < len(trials) else None
    if t is not None and t.state == TS.FAIL and t.user_attrs.get("fail_reason", "").startswith("interrupted"):
        retry_trial(study, t)


def rdb_storage(url: str, attempts: int = 5, **kwargs: Any) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; retried a few times because workers starting together on an empty
    database may race to create its tables (one of them gets an IntegrityError)."""
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


def spawn_workers(search_args: dict[str, Any], n: int, parent_run_id: str) -> list[subprocess.Popen]:
    """Start n worker processes running `search_args` against the study, logging under one parent run.

    Each runs in its own session, so a terminal's Ctrl-C reaches only this process, which then
    forwards exactly one SIGINT to each worker (see `wait_workers`)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # Share the cores instead of oversubscribing them: each worker's torch gets cores / n threads
    # (unless the user pinned a thread count). Two 2-thread workers on 2 cores ran 2.5x slower.
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for i in range(n):
        payload = json.dumps({"search": search_args, "parent_run_id": parent_run_id, "index": i})
        procs.append(subprocess.Popen([sys.executable, "-m", "autocompress.workers", payload], env=env,
                                      start_new_session=True))
    return procs


def wait_workers(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker; on Ctrl-C send each live worker one SIGINT, wait, and re-raise."""
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m autocompress.workers JSON` (started by spawn_workers)."""
    from .api import prepare
    from .plan import PlanError
    from .search import run_worker

    payload = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        settings, ctx = prepare(**payload["search"])
        run_worker(settings, ctx, payload["parent_run_id"])
    except (UserError, PlanError) as e:
        print(f"autocompress worker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
