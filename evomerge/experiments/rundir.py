"""The run directory: resolved config and its hash, the Optuna storage, results."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.experiments.config import ExperimentConfig


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def config_hash(self) -> Path:
        return self.path / "config.sha256"

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def storage(self) -> str:
        """The Optuna storage URI, once the file (if any) is checked to be a sound SQLite database."""
        check_sqlite(self.study_db, "Optuna study storage")
        return f"sqlite:///{self.study_db.resolve()}"

    @property
    def tracking(self) -> Path:
        """The MLflow store and parent run this run directory is tracked in."""
        return self.path / "mlflow.json"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def best_recipe(self) -> Path:
        return self.path / "best_recipe.yml"

    @property
    def started_config(self) -> Path:
        return self.path / ".config.started.yaml"

    @contextmanager
    def session(self) -> Iterator[None]:
        """Hold the run directory for one driver process: a second ``run`` or ``resume``
        of the same directory while one is running is refused (two drivers would ask
        and tell the same study and log its trials twice). The lock is the operating
        system's (``flock``): a killed process holds it no more."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path / ".session.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise EvomergeError(f"{self.path}: another evomerge process is running this run directory") from None
        except OSError as err:
            raise cannot_write(self.path / ".session.lock", err) from None
        try:
            yield
        finally:
            lock.release()

    def create(self, cfg: ExperimentConfig, *, accept_change: bool = False) -> None:
        """Write the resolved config; refuse a directory that holds a run of another config
        unless ``accept_change`` (a forced resume), which records the new one."""
        text = cfg.to_yaml()
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self.config_hash.exists():
            if self.config_hash.read_text().strip() == digest:
                return
            if not accept_change:
                raise EvomergeError(
                    f"{self.path}: holds a run with another config (use 'evomerge resume' or a new --out)"
                )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise cannot_write(self.path, err) from None
        write_atomic(self.config, text)
        if not self.started_config.exists():
            write_atomic(self.started_config, text)
        write_atomic(self.config_hash, digest + "\n")


class RunLog:
    """``RUN_DIR/run.log``: one timestamped line per event (session start and end, every
    finished trial, the final scoring), appended and flushed at once, so a crash loses
    no line already written."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fh = path.open("a", buffering=1)
        except OSError as err:
            raise cannot_write(path, err) from None

    def __call__(self, message: str) -> None:
        from datetime import datetime, timezone

        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            for line in message.splitlines() or [""]:
                self.fh.write(f"{stamp} {line}\n")
            self.fh.flush()
        except OSError as err:
            raise cannot_write(self.path, err) from None

    def trial(self, record, stats) -> None:
        """A search-loop observer."""
        value = "" if record.value is None else f" fitness {record.value:.4f}"
        error = f" error: {record.error}" if record.error else ""
        timing = f" (merge {record.merge_seconds:.2f} s, score {record.score_seconds:.2f} s)"
        self(f"trial {record.number} {record.state}{value}{timing}{error}")

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass  # a line that could not be written was reported when it was written


def _open_existing(path: Path):
    """A connection to an existing SQLite file, never creating one. Read-write, because
    a process killed in the middle of a transaction leaves a hot journal that SQLite
    must roll back on the next open: that recovery is the database working as designed,
    and read-only it fails. The callers only read."""
    import sqlite3

    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)


def check_sqlite(path: Path, what: str) -> None:
    """Refuse a SQLite file that is not a sound database (corrupt, truncated, not SQLite).
    The check writes nothing to a sound file and leaves a refused one exactly as it was."""
    import sqlite3

    if not path.exists():
        return
    try:
        con = _open_existing(path)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as err:
        raise EvomergeError(f"{path}: the {what} is corrupt or truncated ({err}); it was left untouched") from None
    if rows != [("ok",)]:
        detail = "; ".join(str(r[0]) for r in rows[:3])
        raise EvomergeError(f"{path}: the {what} is corrupt ({detail}); it was left untouched")


def holds_study(path: Path, name: str) -> bool:
    """Whether the SQLite file at ``path`` holds the Optuna study ``name``."""
    import sqlite3

    con = _open_existing(path)
    try:
        return con.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
    except sqlite3.Error:
        return False
    finally:
        con.close()


def study_attr(path: Path, name: str, key: str) -> Any:
    """A user attribute of the Optuna study ``name`` in the SQLite file at ``path``, read
    without Optuna and without writing; None when the file, the study or the key is not there."""
    import sqlite3

    if not path.is_file():
        return None
    con = _open_existing(path)
    try:
        row = con.execute(
            "SELECT a.value_json FROM study_user_attributes a JOIN studies s ON a.study_id = s.study_id "
            "WHERE s.study_name = ? AND a.key = ?",
            (name, key),
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return None if row is None else json.loads(row[0])


def cannot_write(path: Path, err: OSError) -> EvomergeError:
    """An OSError while writing (a read-only or full disk, no permission) as one line naming the file."""
    return EvomergeError(f"{path}: cannot write ({err.strerror or err})")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename; an OSError becomes
    one line naming ``path``, and no temporary file is left."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise cannot_write(path, err) from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise cannot_write(path, err) from None
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")
