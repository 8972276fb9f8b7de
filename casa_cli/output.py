"""Where records go: JSONL files written and flushed record by record (with --resume),
JSON lines on stdout, or a table on the terminal; progress bars and messages on stderr.

stdout carries only the data. Everything shown on a terminal passes through `shown`, since
ids, paths and error texts are user data: rich markup in them is printed as it is, and
control and bidirectional-override characters as escapes."""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# C0 and C1 controls (ESC sequences clear the screen or retitle the window), line and
# paragraph separators, bidirectional marks, embeddings, overrides and isolates (U+202E
# shows text backwards), and lone surrogates (which cannot be encoded at all).
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e"
                         r"\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str) -> str:
    """`text` with every control, bidi and surrogate character written as an escape
    (`\\x1b`, `\\u202e`): safe to put on a terminal, and always one line."""
    return _UNSHOWABLE.sub(_escape, text)


def shown(value) -> Text:
    """User data for the terminal: `clean`ed and wrapped as rich Text, so rich reads no
    markup (`[/]`, `[bold red]`) or emoji codes in it."""
    return Text(clean(str(value)))


class MessageConsole(Console):
    """The console behind `stderr`: each string printed is `shown`, whatever the caller
    passes as `markup=`, because casa's messages quote ids, paths and error texts."""

    def print(self, *objects, **options) -> None:
        super().print(*(shown(o) if isinstance(o, str) else o for o in objects), **options)


stderr = MessageConsole(stderr=True, highlight=False, soft_wrap=True)  # one line per message


class OutputError(Exception):
    """An output file that cannot be written, as one line naming it. `runtime` is False
    when the path given cannot be used (a folder, no permission, another writer holds it,
    an input of the same run: exit 2) and True when writing fails midway (disk full, an
    I/O error: exit 1)."""

    def __init__(self, message: str, runtime: bool = False):
        super().__init__(message)
        self.runtime = runtime


def read_records(path: Path) -> Iterator[dict]:
    """The records of a JSONL output file, if it exists (a torn last line from a killed run
    is skipped). Lines split on "\n" only: a record may hold U+2028, which splitlines cuts."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8", newline="\n") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record:
                yield record



def refuse_overwrite(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """OutputError if an output is the same file as an input (through a link or another
    spelling too): opening it for writing would empty the input before it is read."""
    inputs = [Path(i) for i in inputs if Path(i).exists()]
    for output in (Path(o) for o in outputs if Path(o).exists()):
        clash = next((i for i in inputs if os.path.samefile(output, i)), None)
        if clash is not None:
            raise OutputError(f"{output}: this is the input {clash}; writing it would empty "
                              "the input: pick another output")


def check_writable(path: Path) -> None:
    """OutputError now, before a long job, if `path` cannot be written or another writer
    holds it (see `RecordWriter`). An existing file is opened but not changed; nothing is
    created."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a file")
    if path.is_file():
        try:
            file = open(path, "ab", buffering=0)
        except OSError as err:
            raise _unusable(path, err) from None
        with file:  # a shared lock: the ranks of one torchrun job may check at the same time
            _lock(file, path, fcntl.LOCK_SH)


def _open_locked(path: Path):
    """An unbuffered binary file appending to `path` (created if missing, never truncated
    here) that holds an exclusive lock on it, so a second writer is refused before it can
    empty the file. If the file was replaced between the open and the lock (a resumed run
    renames its rewrite into place), the new one is opened instead."""
    while True:
        try:
            file = open(path, "ab", buffering=0)
        except OSError as err:
            raise _unusable(path, err) from None
        _lock(file, path)
        with suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(file.fileno()), os.stat(path)):
                return file
        file.close()


def _lock(file, path: Path, mode: int = fcntl.LOCK_EX) -> None:
    """A lock on `file` (exclusive unless `mode` says otherwise), or OutputError if another
    process holds a writer's. A file that cannot be locked at all (a pipe, some network
    filesystems) is written unlocked."""
    try:
        fcntl.flock(file.fileno(), mode | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise OutputError(f"{path}: another process is writing this file; wait for it to "
                          "finish or pick another output") from None
    except OSError:
        pass


def _unusable(path: Path, err: OSError) -> OutputError:
    if err.errno == errno.EISDIR:
        return OutputError(f"{path}: is a folder, not a file")
    return OutputError(f"{path}: cannot write here ({err.strerror})")


class RecordWriter:
    """Appends records to a JSONL file, one line each, handed to the OS as it is written, so
    a killed run loses at most the record in flight. The file is locked for the writer's
    life (a second writer gets OutputError, exit 2). `resume` keeps the finished records
    there (dropping error records, which are retried, and a torn last line), else the file
    starts empty. A failed write (disk full, I/O error) raises OutputError naming the file,
    with the records before it intact and no partial line left."""

    def __init__(self, path: Path, resume: bool = False):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unusable(self.path, err) from None
        self.file = _open_locked(self.path)
        # Not a device (/dev/null) or a pipe, which are neither truncated nor rewritten.
        self.regular = stat.S_ISREG(os.fstat(self.file.fileno()).st_mode)
        try:
            if self.regular:
                self._keep_finished() if resume else self.file.truncate(0)
        except OSError as err:
            self.file.close()
            raise self._failed(err) from None
        except BaseException:
            self.file.close()
            raise

    def _keep_finished(self) -> None:
        """Rewrite the file with its finished records only: written aside, synced and
        renamed over it, so a kill midway leaves the old file whole. The new file is locked
        before the rename, so the lock never lapses."""
        kept = [r for r in read_records(self.path) if "error" not in r]
        staging = self.path.with_name(self.path.name + ".resume")
        file = open(staging, "wb", buffering=0)
        try:
            _lock(file, staging)
            _write_all(file, "".join(_json_line(r) for r in kept).encode("utf-8"))
            os.fsync(file.fileno())
            os.replace(staging, self.path)
        except BaseException:
            file.close()
            with suppress(OSError):
                staging.unlink()
            raise
        self.file.close()
        self.file = file

    def write(self, record: dict) -> None:
        end = self.file.seek(0, os.SEEK_END) if self.regular else None
        try:
            _write_all(self.file, _json_line(record).encode("utf-8"))
        except OSError as err:
            if end is not None:
                with suppress(OSError):
                    self.file.truncate(end)  # no torn line after the records already written
            raise self._failed(err) from None

    def _failed(self, err: OSError) -> OutputError:
        return OutputError(f"{self.path}: writing failed ({err.strerror}); the records "
                           "written before are kept", runtime=True)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_all(file, data: bytes) -> None:
    """All of `data`: an unbuffered write may take only part of it."""
    while data:
        data = data[file.write(data):]


def _json_line(record: dict) -> str:
    return json.dumps(strict_json(record), ensure_ascii=False) + "\n"


def strict_json(value):
    """NaN and infinities (a metric undefined on a one-class set) as null: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def print_json(record: dict) -> None:
    sys.stdout.write(_json_line(record))
    sys.stdout.flush()


def print_table(records: Sequence[dict], columns: Sequence[str], title: str | None = None,
                console: Console | None = None, compact: bool = False) -> None:
    """`records` as a table on stdout (or `console`), a row each and a column per name in
    `columns`; every cell and the title are `shown`. `compact` is for a table of numbers
    that must fit 80 columns: no vertical rules, cells right-aligned and never wrapped,
    the first column cut with "…" past 14 characters."""
    table = Table(title=None if title is None else shown(title),
                  box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD)
    for i, column in enumerate(columns):
        if not compact:
            table.add_column(column, overflow="fold")
        elif i == 0:
            table.add_column(column, no_wrap=True, max_width=14)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for record in records:
        table.add_row(*(shown(_cell(record.get(column))) for column in columns))
    (console or Console()).print(table)


def print_fields(info: dict, title: str) -> None:
    """`info` as a two-column table (field, value) on stdout."""
    table = Table(title=shown(title), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        table.add_row(shown(key), shown(_cell(value)))
    Console().print(table)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


@contextmanager
def progress_tasks(records_on_stdout: bool = False):
    """Progress bars on stderr, shown only when stderr is a terminal. Yields add(name,
    total) -> advance(n), so one display holds every stage of a long job. The display never
    captures stdout or stderr (rich's default): records printed meanwhile go to stdout
    itself, wherever it leads. `records_on_stdout`: records are printed while the bars run,
    so when stdout is a terminal too (the same screen) no bar is drawn between them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    visible = sys.stderr.isatty() and not (records_on_stdout and sys.stdout.isatty())
    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn(), console=stderr,
                   disable=not visible, transient=True,
                   redirect_stdout=False, redirect_stderr=False)
    with bar:
        def add(name: str, total: int | None):
            task = bar.add_task(name, total=total)
            return lambda n=1: bar.advance(task, n)
        yield add


@contextmanager
def progress(total: int | None, description: str, records_on_stdout: bool = False):
    """One progress bar; yields advance(n)."""
    with progress_tasks(records_on_stdout) as add:
        yield add(description, total)
