"""Faults of the storage under a run: the disk filling up during an export, a corrupt,
truncated or emptied study storage, a corrupt tracking store. Each gives one clear
line and a non-zero exit, and leaves every file that was there exactly as it was."""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.experiments.run import RunOptions, run_experiment

from ..search.conftest import tiny_config
from .common import cli_env


def _digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def finished_run(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    out = tmp_path / "run"
    run_experiment(tiny_config(tiny_zoo).resolved(), out, RunOptions(quiet=True, in_process=True))
    return out


def test_disk_full_during_export(finished_run, tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG, as a full disk
    fails with ENOSPC: the weights (350 kB) do not fit, the small files would."""
    exports = tmp_path / "exports"
    assert main(["export", str(finished_run), str(exports / "first"), "--no-register"]) == 0
    before = _digest(exports / "first")
    size = (exports / "first" / "model.safetensors").stat().st_size

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    cmd = [sys.executable, "-m", "evomerge.cli", "export", str(finished_run), str(exports / "second"), "--no-register"]
    env = cli_env()
    proc = subprocess.run(cmd, env=env, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"evomerge export: error: {exports / 'second'}")
    assert "no space left on device (or file too large) while writing the merge" in proc.stderr
    assert sorted(p.name for p in exports.iterdir()) == ["first"]  # no OUT_DIR, no temporary directory
    assert _digest(exports / "first") == before  # the earlier export intact


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_study_storage_is_refused_untouched(finished_run, tmp_path, capsys, damage):
    db = finished_run / "study.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 5] if damage == "truncate" else b"not a database " * 500)
    before = _digest(finished_run)
    for argv in (
        ["status", str(finished_run)],
        ["resume", str(finished_run), "--quiet"],
        ["export", str(finished_run), str(tmp_path / "out"), "--no-register"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "study.db: the Optuna study storage is corrupt" in err
        assert "left untouched" in err
    assert _digest(finished_run) == before and not (tmp_path / "out").exists()


def test_emptied_study_storage_is_not_reinitialised_on_resume(finished_run, capsys):
    (finished_run / "study.db").write_bytes(b"")
    assert main(["resume", str(finished_run), "--quiet"]) == 2
    assert "holds no study 'tiny'" in capsys.readouterr().err
    assert (finished_run / "study.db").stat().st_size == 0


def test_corrupt_tracking_store_is_refused_before_the_run_starts(tiny_zoo, tmp_path, capsys):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"\x00garbage" * 1000)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(tiny_config(tiny_zoo).to_yaml())
    argv = ["run", str(cfg), "--out", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{store}", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlflow.db: the MLflow tracking store is corrupt" in err
    assert not (tmp_path / "run").exists() and store.read_bytes() == b"\x00garbage" * 1000
    assert main(["leaderboard", "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert "MLflow tracking store is corrupt" in capsys.readouterr().err


KILLED_MID_TRANSACTION = """
import os, signal, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("CREATE TABLE studies (study_name TEXT, pad BLOB)")
con.execute("INSERT INTO studies VALUES ('tiny', zeroblob(1000))")
con.execute("PRAGMA cache_size=2")  # spill the open transaction's pages into the file
con.execute("BEGIN")
for _ in range(2000):
    con.execute("INSERT INTO studies VALUES ('half-written', zeroblob(1000))")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_hot_journal_left_by_kill_9_is_rolled_back_not_refused(tmp_path):
    """A process killed inside a transaction leaves a hot journal: the next open must
    roll it back (read-only opening fails there), and the database is sound again."""
    from evomerge.experiments.rundir import check_sqlite, holds_study

    db = tmp_path / "study.db"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_TRANSACTION, str(db)], timeout=60)
    assert proc.returncode == -9 and (tmp_path / "study.db-journal").stat().st_size > 0
    check_sqlite(db, "Optuna study storage")  # no refusal
    assert holds_study(db, "tiny") and not holds_study(db, "half-written")
    assert not (tmp_path / "study.db-journal").exists()
