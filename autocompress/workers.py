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
from typing import Any, Callable

import optuna

from .heartbeat import retried_numbers, retry_trial
from .storage import StudyLock
from .trials import FINISHED, TS, Attr

WORKER = f"{socket.gethostname()}:{os.getpid()}"


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
                    sampler_for: Callable[[int], optuna.samplers.BaseSampler] | None = None,
                    done: Callable[[], bool] | None = None) -> int:
    """Run trials until the study holds `total` counted trials, or until `done()` (asked before
    each trial, under the lock, so every worker sees the same study) says there is no point in
    more; returns how many this worker ran.

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
        trial.set_user_attr(Attr.WORKER, WORKER)
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr(Attr.FAIL_REASON, "interrupted (SIGINT)")
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
                if done is not None and done():
                    break
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
    if t is not None and t.state == TS.FAIL and t.user_attrs.get(Attr.FAIL_REASON, "").startswith("interrupted"):
        retry_trial(study, t)


def spawn_workers(options: dict[str, Any], n: int, parent_run_id: str) -> list[subprocess.Popen]:
    """Start n worker processes (`python -m autocompress.worker_main`) running the search with
    `options` (SearchSettings.options(): plain JSON) against the study, under one parent run.

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
        payload = json.dumps({"options": options, "parent_run_id": parent_run_id, "index": i})
        procs.append(subprocess.Popen([sys.executable, "-m", "autocompress.worker_main", payload], env=env,
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
