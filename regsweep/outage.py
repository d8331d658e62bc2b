"""What regsweep does when a store stops answering (the MLflow tracking server or the Optuna storage), and the
bookkeeping that lets a later command clean up after a process that is gone.

Also here, as they serve the same end: `store_locked` (one process at a time creates a new database's tables),
`tag_run` (tags that survive a concurrent writer), URLs without credentials for messages, and process liveness
(`worker_id` on each run, `pid_alive`, `when_parent_gone`, `end_orphaned_runs`).

Training never waits on the tracker: per-epoch metrics are queued (MLflow's async logging) and MLflow's own
HTTP retries, set from `--tracking-timeout`, keep every request alive through a short outage. A watch thread
asks the server's `/health` meanwhile; once it has not answered for the timeout, the main thread gets a
`TrackingOutage` and the command stops with one line, leaving the run RUNNING (nothing can be written to an
unreachable store). The next `train` or `optimize` against the experiment ends such runs KILLED.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

EXIT_OUTAGE = 75  # sysexits' EX_TEMPFAIL: nothing is wrong with the input; run the same command again later
WORKER_TAG = "regsweep.worker"  # host:pid of the process training a run, so a later command can tell it is gone
STOP_REASON_TAG = "regsweep.stop_reason"  # why a run stopped, in words
TAG_LIMIT = 5000  # characters of a tag value written: MLflow 2's limit (3.x allows 8,000), so older servers take it
MAX_TIMEOUT = 900  # seconds; beyond this MLflow's retry knobs cannot keep one request alive that long
WATCH_SIGNAL = signal.SIGUSR1


def redact(url: str) -> str:
    """A store's URL as messages, tags and printed hints show it: never with a password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def without_credentials(url: str) -> str:
    """The URL with no user or password at all: one a browser opens, asking for them itself."""
    return re.sub(r"//[^/@]*@", "//", url)


PG_LOCK_KEY = 0x7265677377656570  # "regsweep": the PostgreSQL advisory lock under which a store is first opened


def store_locked(url: str):
    """A lock that every process opening the same database takes, held for the duration, so that one at a time
    makes a new database's tables: two that do it at once fail one of them (PostgreSQL: "duplicate key value
    violates unique constraint pg_type_typname_nsp_index"), and on SQLite can leave the file half made for good
    (MLflow's migrations copy tables through `_alembic_tmp_*` ones), which no retry repairs. Other URLs are left
    alone, and so is a database that cannot be reached or opened (the store then reports why)."""
    path = sqlite_file(url)
    if path:
        return _sqlite_file_locked(path)
    if url.startswith("postgresql"):
        return _postgres_locked(url)
    return contextlib.nullcontext()


def sqlite_file(url: str) -> str | None:
    """The file a sqlite: URL names, as SQLAlchemy opens it (%20 decoded, the query dropped); None for other URLs,
    an in-memory database, or a `uri=true` one, whose "path" is a URI that SQLite alone resolves."""
    if not url.startswith("sqlite:"):
        return None
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    if not parsed.database or parsed.database == ":memory:" or parsed.query.get("uri") == "true":
        return None
    return parsed.database


@contextmanager
def _sqlite_file_locked(path: str):
    """An exclusive flock on the database file (made empty where it is missing, as SQLite would make it).
    SQLite's own locks are fcntl ones, so nothing else waits on this."""
    import fcntl

    with contextlib.ExitStack() as held:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            pass  # without the lock
        else:
            held.callback(os.close, fd)  # closing the file releases its lock
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield


@contextmanager
def _postgres_locked(url: str):
    """pg_advisory_xact_lock in a transaction of its own, on a connection of its own: a transaction's lock, not a
    session's, as behind a pooler such as PgBouncer a session outlives the connection. Without the lock where the
    database is unreachable or refusing, or where another process has held it for over 2 minutes (a hung one)."""
    import sqlalchemy

    with contextlib.ExitStack() as held:
        try:
            driver = sqlalchemy.engine.make_url(url).get_driver_name()
            connect_args = {"connect_timeout": 10} if driver in ("psycopg", "psycopg2") else {}
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
            held.callback(engine.dispose)
            # Closing the connection ends the transaction, and the lock with it (rolled back: it wrote nothing).
            connection = held.enter_context(engine.connect())
            connection.execute(sqlalchemy.text("SET LOCAL lock_timeout = '120s'"))
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        except Exception:  # noqa: BLE001 - see above; a signal (a BaseException) still stops the wait
            held.close()  # without the lock
        yield


def tag_run(client, run_id: str, tags: dict[str, str]) -> None:
    """Set `tags` on a run that another process may tag at the same moment: a sweep's parent run, which every
    command on the study starts and ends, or a dead worker's run that two commands find at once. MLflow's
    `set_tag` reads, then inserts, and the slower of two new writes of one key fails on the tags table's unique
    key ("UNIQUE constraint failed: tags.key, tags.run_uuid"); `log_batch` tries such a write again."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


class Outage(BaseException):
    """A store stopped answering. A BaseException, like KeyboardInterrupt: it stops the work in progress,
    and no `except Exception` in MLflow, Optuna or the training code may swallow it or fail a run over it."""
    tracking = False  # True when the MLflow tracking store itself is what cannot be reached

    def __init__(self, message: str):
        super().__init__(message)
        self.trial_number: int | None = None  # the sweep's interrupted trial, when there was one


class TrackingOutage(Outage):
    """The MLflow tracking server has not answered for --tracking-timeout seconds."""
    tracking = True


class StorageOutage(Outage):
    """The Optuna storage (its database) refused or dropped the connection."""


def retry_sleeps(retries: int, factor: int) -> list[float]:
    """urllib3's sleeps before each of `retries` retries of a refused connection: 0, 2f, 4f, ..., each at
    most 120 s."""
    return [min(120, 0 if k == 1 else factor * 2 ** (k - 1)) for k in range(1, retries + 1)]


def probe_interval(timeout: float) -> float:
    """Seconds between health probes: a small share of the timeout, at most 5."""
    return max(0.5, min(5.0, timeout / 20))


def http_settings(timeout: float) -> dict[str, str]:
    """MLflow's own retry knobs for a given --tracking-timeout.

    One request must outlast the timeout (the watch, not MLflow, decides when to give up, so that a short
    outage loses nothing), but not by much: MLflow's defaults (7 retries, factor 2, 120 s per attempt) keep
    a request going for minutes. Among MLflow's allowed values (at most 10 retries, factor at most 120),
    those whose retries span at least timeout + two probes + 5 s; of these, the one with the shortest
    longest sleep, which bounds how late a request notices that the server is back."""
    target = timeout + 2 * probe_interval(timeout) + 5
    _, span, retries, factor = min((max(sleeps), sum(sleeps), r, f) for r in range(1, 11) for f in range(1, 121)
                                   if sum(sleeps := retry_sleeps(r, f)) >= target)
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
            # One attempt against a server that accepts but does not answer waits at most this long.
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(min(120, max(5, timeout))))}


@contextmanager
def mlflow_http_settings(timeout: float):
    """Set MLflow's HTTP retry environment for the duration (worker processes started inside inherit it)."""
    settings = http_settings(timeout)
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def health(uri: str, timeout: float) -> None:
    """GET the tracking server's /health as MLflow's own client reaches the server (requests: credentials in
    the URI, MLflow's TLS settings); raises requests' error when it does not answer OK within `timeout` s."""
    import requests
    from mlflow.environment_variables import MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH

    verify = False if MLFLOW_TRACKING_INSECURE_TLS.get() else (MLFLOW_TRACKING_SERVER_CERT_PATH.get() or True)
    requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, verify=verify).raise_for_status()


def answers(uri: str, timeout: float) -> bool:
    """Whether the tracking server's /health endpoint answers within `timeout` seconds."""
    try:
        health(uri, timeout)
        return True
    except (OSError, ValueError):  # requests' errors are OSErrors
        return False


@contextmanager
def tracking_watch(timeout: float, uri: str | None = None):
    """While the block runs, probe the tracking server; once it has not answered for `timeout` seconds,
    raise TrackingOutage in the main thread, wherever it is (training, or inside MLflow's retries).

    Only for HTTP tracking servers (a local store has no outages of this kind) and in the main thread
    (Python runs signal handlers there)."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    if not is_http(uri) or threading.current_thread() is not threading.main_thread():
        yield
        return
    message = (f"the MLflow tracking server at {redact(uri)} has not answered for {timeout:g} s "
               "(--tracking-timeout)")
    stop, lock, main = threading.Event(), threading.Lock(), threading.main_thread().ident
    interval = probe_interval(timeout)

    def on_signal(signum, frame):
        raise TrackingOutage(message)

    def watch():
        silent_since = None
        while not stop.wait(interval):
            started = time.monotonic()
            if answers(uri, timeout=max(1.0, interval)):
                silent_since = None
                continue
            silent_since = silent_since or started
            if time.monotonic() - silent_since >= timeout:
                with lock:  # never after the block has ended and the handler is gone
                    if not stop.is_set():
                        stop.set()
                        # A real signal, not just a flag: it also wakes the main thread from a sleep
                        # between MLflow's retries or from waiting on the async logging queue.
                        signal.pthread_kill(main, WATCH_SIGNAL)
                return

    previous = signal.signal(WATCH_SIGNAL, on_signal)
    threading.Thread(target=watch, name="regsweep-tracking-watch", daemon=True).start()
    try:
        yield
    finally:
        with lock:
            stop.set()
        signal.signal(WATCH_SIGNAL, previous)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def when_parent_gone(act) -> None:
    """Call `act()` from a daemon thread once this spawned process's parent has gone, however it went (SIGKILL
    included, which lets the parent tell nobody): a worker must not train on, or wait forever, for a command
    that no longer exists. The parent is the one multiprocessing records, so a parent that died before this
    call is noticed too."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1)
        act()

    threading.Thread(target=watch, name="regsweep-parent-watch", daemon=True).start()


def parent_is_mlflow_run() -> bool:
    """Whether this process was started by `mlflow run` itself (`mlflow run ...` or `python -m mlflow run ...`
    as the parent's command line; read from /proc, so Linux only)."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(os.path.basename(a) == "mlflow" and b == "run" for a, b in zip(args, args[1:]))


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return True


def end_orphaned_runs(experiment_id: str, tracking_uri: str | None = None) -> list[str]:
    """End KILLED the RUNNING runs of `experiment_id` whose process ran on this host and is gone: a run
    whose process lost the tracking store could not say that it stopped. Returns their ids."""
    from mlflow.tracking import MlflowClient

    client, host, ended = MlflowClient(tracking_uri), socket.gethostname(), []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    for run in runs:
        worker = run.data.tags.get(WORKER_TAG, "")
        run_host, _, pid = worker.rpartition(":")
        if run_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        tag_run(client, run.info.run_id, {STOP_REASON_TAG: (
            f"its process ({worker}) ended while the run was RUNNING, without ending it (killed outright, or "
            "stopped while the tracking store was unreachable); ended KILLED by the next regsweep command")})
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def command_line() -> str:
    """The command as typed, to tell the user what resumes the work."""
    return shlex.join(["regsweep", *sys.argv[1:]])


def exit_now(line: str) -> None:
    """Print the line and leave at once. After a tracking outage MLflow's async-logging threads are still
    retrying requests to the unreachable server, and a normal exit would wait for them (its at-exit hooks
    would also retry ending the run); everything that must be recorded is in the Optuna storage, and the
    run is ended KILLED by the next command."""
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_OUTAGE)
