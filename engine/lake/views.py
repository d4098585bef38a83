"""The analysts' views file, `DATA_DIR/callsentry.duckdb`: DuckDB views (no data) over
the lake's Parquet, written whole into a temporary file and renamed into place
(engine.lake.parquet says why the engine never holds it open).

`write_views_file` writes it in this process. `ViewsFile` writes it in a process of its
own (`main`, the statements on its standard input), which loads DuckDB and this module
only, started before the caller loads what it needs itself: the caller's work goes on
meanwhile, on another core, and a caller with nothing else to ask of DuckDB never loads
it (replay into a new data dir). Imports nothing of the engine at the top, so that
process stays small.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

    import duckdb

DATABASE = "callsentry.duckdb"


def sql_text(value: str) -> str:
    """`value` as an SQL string literal (a path may hold a quote; views cannot take
    parameters, so the path is written into their SQL)."""
    return "'" + value.replace("'", "''") + "'"


def analysts_command(data_dir: Path) -> str:
    """The command an analyst runs to query `data_dir`'s lake read-only: the DuckDB CLI
    installed beside this Python (the `duckdb-cli` package puts it in the venv's bin,
    which is seldom on PATH), else `duckdb` as PATH finds it."""
    import shlex

    beside = Path(sys.executable).parent / "duckdb"
    program = str(beside) if sys.executable and beside.is_file() else "duckdb"
    return shlex.join([program, "-readonly", str(data_dir / DATABASE)])


def write_views_file(
    data_dir: Path, statements: Sequence[str], con: duckdb.DuckDBPyConnection | None = None
) -> None:
    """Write `data_dir/callsentry.duckdb` holding what `statements` (CREATE VIEW ...)
    create, and swap it in atomically: renaming over the file never disturbs an
    analyst who has the old one open read-only; the next connection sees the new
    views. `con`: an in-memory connection to use (and close), else one is made.
    Raises OSError or duckdb.Error."""
    import duckdb

    partial = data_dir / f".callsentry.{uuid.uuid4().hex}.duckdb"
    try:
        with con if con is not None else duckdb.connect() as con:
            data_dir.mkdir(parents=True, exist_ok=True)
            # The oldest storage format that has what we use, so analysts' DuckDB
            # CLIs and libraries from 1.0 on can open the file too.
            con.execute(f"ATTACH {sql_text(str(partial))} AS analytics (STORAGE_VERSION 'v1.0.0')")
            con.execute("USE analytics")
            # One transaction: one commit to the file's write-ahead log (and its
            # sync), where each view on its own would commit and sync.
            con.execute("BEGIN TRANSACTION")
            for statement in statements:
                con.execute(statement)
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        os.replace(partial, data_dir / DATABASE)
    finally:
        partial.unlink(missing_ok=True)
        Path(str(partial) + ".wal").unlink(missing_ok=True)


class ViewsFileError(OSError):
    """The process writing the views file failed; the message says how (an OSError, so
    whatever reports a storage failure reports this one)."""


# The folder holding the `engine` package: the process finds this module there, last,
# however this one was started (installed, or from a checkout's folder).
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_START = (
    "import sys; sys.path.append({root!r}); from engine.lake.views import main; sys.exit(main())"
)


class ViewsFile:
    """`write_views_file` in a process of its own. Started as soon as the caller knows it
    will want the file: the process loads DuckDB meanwhile, then waits for `publish`
    (what to write, where). `wait` until the file is in place (raises what went wrong);
    `close` in any case (raises nothing; unpublished, the process ends writing nothing).
    Where this interpreter cannot say how to start another, `publish` writes the file
    here and now."""

    def __init__(self) -> None:
        import subprocess  # the parent's alone

        self.target: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stdin: IO[bytes] | None = None
        if sys.executable:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _START.format(root=str(_PACKAGE_ROOT))],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self._stdin = self._process.stdin

    def pipe_ends(self) -> list[int]:
        """This process's ends of the pipes to the views process: a process forked from
        this one closes them first, or the views process, which reads its request to
        the end of its input, would wait for that one to end too."""
        process = self._process
        if process is None:
            return []
        return [pipe.fileno() for pipe in (process.stdin, process.stderr) if pipe is not None]

    def publish(self, data_dir: Path, statements: Sequence[str]) -> None:
        """Have the process write `data_dir`'s views file from `statements`."""
        self.target = data_dir / DATABASE
        if self._process is None:
            write_views_file(data_dir, statements)
            return
        request = json.dumps({"data_dir": str(data_dir), "statements": list(statements)})
        self._send(request.encode("utf-8"))

    def wait(self) -> None:
        """Until the file is in place; raises ViewsFileError if it is not."""
        if self._process is None:
            return
        process, self._process = self._process, None
        self._send(b"")  # unpublished: the process ends writing nothing
        assert process.stderr is not None
        with process.stderr:
            errors = process.stderr.read()
        process.wait()
        if process.returncode != 0:
            said = errors.decode("utf-8", "replace").strip().splitlines()
            why = said[-1] if said else f"exit code {process.returncode}"
            raise ViewsFileError(f"writing the views file {self.target} failed: {why}")

    def close(self) -> None:
        with contextlib.suppress(ViewsFileError):
            self.wait()

    def _send(self, request: bytes) -> None:
        """The request, once: the process reads to the end of its input."""
        stdin, self._stdin = self._stdin, None
        if stdin is None:
            return
        try:
            if request:
                stdin.write(request)
            stdin.close()
        except OSError:
            pass  # it ended already: wait() says why


def main() -> int:
    """The process ViewsFile starts: DuckDB loaded first, then the request on standard
    input (none: nothing to write), what went wrong on standard error (one line, the
    last), exit code 0 once the file is in place."""
    try:
        import duckdb

        # Connected while the parent makes the request: a connection's start is a
        # good part of writing the file.
        with duckdb.connect() as con:
            data = sys.stdin.buffer.read()
            if data:
                request = json.loads(data)
                write_views_file(Path(request["data_dir"]), request["statements"], con)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # said to the parent, which raises it
        # DuckDB's messages run over several lines (the statement, a caret under it):
        # the first says what is wrong.
        said = str(error).strip().splitlines()
        print(f"{type(error).__name__}: {said[0] if said else ''}", file=sys.stderr)
        return 1
    # The file is in place (or none was asked for) and nothing is left to flush: the
    # parent waits for this process's end, which the interpreter's and DuckDB's
    # teardown would delay.
    sys.stderr.flush()
    os._exit(0)
