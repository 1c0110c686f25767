"""Durability: the ledger records a partition as succeeded only after its output would survive
a power cut, seen as the order of writes and syncs of real runs under strace; and processes
killed at any moment leave the ledger, the queue and the sink whole."""

import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from .conftest import require, runex_cli, work_pipeline, write

# -- reading strace's output -----------------------------------------------------------------
#
# `strace -f -y -qq -o FILE` (checked with strace 6.1) writes one line per call, prefixed by
# the thread id; a call that another thread interrupts is split into `name(args <unfinished
# ...>` and, later, `<... name resumed>rest) = result` on lines of the same thread. `-y` shows
# each descriptor as `fd</absolute/path>`, and AT_FDCWD as `AT_FDCWD</cwd>`, but rename's
# plain paths are as the program gave them, relative to its current folder:
#
#     6669  rename("out/parts/part-00000.jsonl.tmp-6669", "out/parts/part-00000.jsonl") = 0
#     6669  renameat(3</p/out>, "a", 3</p/out>, "b") = 0
#     6669  renameat2(AT_FDCWD</p>, "a", AT_FDCWD</p>, "b", RENAME_NOREPLACE) = 0
#
# Strings are C-escaped (`\"`, `\n`, octal for other bytes). Signals are shown as lines
# `--- SIGCHLD {...} ---`, which are skipped. Threads appear under their own ids, so calls are
# grouped by process through the clones that made the threads (CLONE_THREAD).

WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}
SYNCS = {"fsync", "fdatasync"}
RENAMES = {"rename", "renameat", "renameat2"}
CLONES = {"clone", "clone3", "fork", "vfork"}
CHDIRS = {"chdir", "fchdir"}
# `?`: no error where a call does not exist (aarch64 has no rename, fork or vfork)
TRACED = ",".join("?" + name for name in sorted(WRITES | SYNCS | RENAMES | CLONES | CHDIRS))

START = re.compile(r"(\d+)\s+(\w+)\((.*)$")
RESUMED = re.compile(r"(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
UNFINISHED = " <unfinished ...>"
RESULT = re.compile(r"(.*)\)\s+= (-?\d+|\?)(?:\s.*)?$")  # the last `) = N` of the line
DESCRIPTOR = re.compile(r"\s*(?:AT_FDCWD|-?\d+)<((?:[^>\\]|\\.)*)>")
ARGUMENT = re.compile(r'(?P<fd>AT_FDCWD|-?\d+)(?:<(?P<path>(?:[^>\\]|\\.)*)>)?'
                      r'|"(?P<string>(?:[^"\\]|\\.)*)"')


@dataclass
class Call:
    tid: int
    name: str
    args: str
    lines: list[tuple[int, str]]  # (line number, text): one, or the two halves of a split call
    result: int | None = None  # None: it never returned (or returned `?`)

    @property
    def start(self) -> int:
        return self.lines[0][0]

    @property
    def end(self) -> int | None:
        return self.lines[-1][0] if self.result is not None else None

    def show(self) -> list[str]:
        return [f"  line {n}: {text[:220]}{'...' if len(text) > 220 else ''}"
                for n, text in self.lines]


def parse(path: Path) -> list[Call]:
    calls, open_calls = [], {}
    with open(path, encoding="latin-1") as f:
        for number, text in enumerate(f, 1):
            text = text.rstrip("\n")
            if m := RESUMED.match(text):
                call = open_calls.pop(int(m[1]), None)
                if call is not None:
                    call.lines.append((number, text))
                    finish(call, call.args + m[3])
            elif m := START.match(text):
                call = Call(int(m[1]), m[2], m[3], [(number, text)])
                calls.append(call)
                if call.args.endswith(UNFINISHED):
                    call.args = call.args[:-len(UNFINISHED)]
                    open_calls[call.tid] = call
                else:
                    finish(call, call.args)
    return calls


def finish(call: Call, text: str) -> None:
    m = RESULT.match(text)
    call.args = m[1] if m else text
    call.result = int(m[2]) if m and m[2] != "?" else None


def unescape(text: str) -> str:
    return os.fsdecode(text.encode("latin-1").decode("unicode_escape").encode("latin-1"))


def descriptor_path(call: Call) -> str | None:
    m = DESCRIPTOR.match(call.args)
    return unescape(m[1]) if m else None


def rename_paths(call: Call, cwd: str) -> tuple[str, str]:
    """The old and new absolute paths of a rename, renameat or renameat2."""
    folder, paths = cwd, []
    for m in ARGUMENT.finditer(call.args):
        if m["string"] is None:
            folder = unescape(m["path"]) if m["path"] is not None else (
                cwd if m["fd"] == "AT_FDCWD" else None)
            continue
        name = unescape(m["string"])
        assert folder is not None or name.startswith("/"), (
            f"cannot tell which folder {name!r} is in:", *call.show())
        paths.append(os.path.realpath(os.path.join(folder or "/", name)))
        folder = cwd  # rename(2) has no descriptors: both paths are from the current folder
    assert len(paths) >= 2, ("cannot read the paths of", *call.show())
    return paths[0], paths[1]


def order(call: Call) -> int | None:
    """Where a call falls among its process's others: a sync counts once it returned, any
    other call from when it started."""
    return call.end if call.name in SYNCS else call.start


# -- the rule: no ledger write after output of the sink that this process did not sync ----------

@dataclass
class Sink:
    """What is output of the sink and when it is durable.

    sqlite: a write to the file that holds committed transactions, durable once this process
    synced that file: the -wal in WAL mode; the database itself with a rollback journal. In WAL
    mode, writes to the database are a checkpoint's copies of pages that SQLite synced in the
    -wal first, and stay there until a checkpoint that copied everything synced the database
    (a checkpoint held back by a reader writes the database and leaves it unsynced, safely).
    The -journal holds the pages' old contents, not output; SQLite syncs it before it writes
    the database.

    Files: a part file or the merged file renamed into place, durable if the renamed file was
    synced before the rename and its folder after it (or written in place, once synced)."""

    database: str = ""  # sqlite
    wal: bool = True  # sqlite: in WAL mode
    parts: str = ""  # files: the folder of the part files
    merge: str = ""  # files: the merged file

    def sqlite_file(self, path: str) -> bool:
        return bool(self.database) and (path == self.database + "-wal"
                                        or (not self.wal and path == self.database))

    def output_file(self, path: str) -> bool:
        """The merged file, or a part in `parts` (or, with `mode = "replace"`, in the run's
        folder under `parts.runs`)."""
        folder = os.path.dirname(path)
        return path == self.merge or (
            (folder == self.parts or os.path.dirname(folder) == self.parts + ".runs")
            and re.fullmatch(r"part-\d{5,}\.[^.]+", os.path.basename(path)) is not None)


@dataclass
class Process:
    cwd: str
    unsynced: dict = field(default_factory=dict)  # path -> (first write since its sync, why)
    unnamed: dict = field(default_factory=dict)  # folder -> [(rename into it, why)]
    never: list = field(default_factory=list)  # [(rename of a file not synced first, why)]
    written: dict = field(default_factory=dict)  # path -> order of its last write
    synced: dict = field(default_factory=dict)  # path -> order of its last sync
    outputs: int = 0  # outputs since this process last wrote the ledger

    def pending(self) -> list[tuple[Call, str]]:
        return sorted([*self.unsynced.values(), *(r for rs in self.unnamed.values() for r in rs),
                       *self.never], key=lambda item: order(item[0]))


@dataclass
class Check:
    trace: Path
    sink: Sink
    ledger: tuple[str, str]  # the ledger's database and its -wal
    root: int = 0  # the process strace started: the consumer; the others are its workers
    sink_writes: int = 0  # in worker processes
    ledger_writes: int = 0  # in worker processes
    records: int = 0  # ledger writes checked that followed output of the sink in their process
    most: int = 0  # most outputs before one such ledger write
    violations: list = field(default_factory=list)  # [(pid, ledger write, pending)]

    def run(self, calls: list[Call], cwd: str) -> "Check":
        thread_of = {c.result: c.tid for c in calls
                     if c.name in CLONES and c.result and "CLONE_THREAD" in c.args}

        def pid(tid: int) -> int:
            while tid in thread_of:
                tid = thread_of[tid]
            return tid

        self.root = pid(calls[0].tid)
        procs = {self.root: Process(cwd)}
        for call in sorted((c for c in calls if order(c) is not None), key=order):
            p = pid(call.tid)
            proc = procs.setdefault(p, Process(cwd))
            if call.result is not None and call.result < 0:
                continue  # failed: changed nothing
            if call.name in CLONES:
                if call.result and call.result not in thread_of:  # a new process
                    procs.setdefault(call.result, Process(proc.cwd))
            elif call.name == "chdir":
                name = unescape(ARGUMENT.search(call.args)["string"])
                proc.cwd = os.path.realpath(os.path.join(proc.cwd, name))
            elif call.name == "fchdir":
                proc.cwd = descriptor_path(call) or proc.cwd
            elif call.name in SYNCS:
                path = descriptor_path(call)
                proc.synced[path] = order(call)
                proc.unsynced.pop(path, None)
                proc.unnamed.pop(path, None)
            elif call.name in WRITES:
                self.write(p, proc, call, descriptor_path(call))
            elif call.name in RENAMES:
                self.rename(p, proc, call, *rename_paths(call, proc.cwd))
        return self

    def write(self, pid: int, proc: Process, call: Call, path: str | None) -> None:
        worker = pid != self.root
        if path in self.ledger:
            self.ledger_writes += worker
            if pending := proc.pending():
                self.violations.append((pid, call, pending))
            if proc.outputs:
                self.records += 1
                self.most = max(self.most, proc.outputs)
                proc.outputs = 0
            return
        proc.written[path] = order(call)
        if self.sink.sqlite_file(path) or self.sink.output_file(path):
            self.sink_writes += worker
            proc.outputs += 1
            proc.unsynced.setdefault(path, (call, f"{path} was not synced after this write"))

    def rename(self, pid: int, proc: Process, call: Call, old: str, new: str) -> None:
        if not self.sink.output_file(new):
            return
        self.sink_writes += pid != self.root
        proc.outputs += 1
        proc.unsynced.pop(new, None)
        if proc.synced.get(old, -1) < proc.written.get(old, 0):
            proc.never.append((call, f"{old} was renamed before it was synced"))
        folder = os.path.dirname(new)
        proc.unnamed.setdefault(folder, []).append(
            (call, f"the folder {folder} was not synced after this rename"))

    def report(self) -> str:
        pid, call, pending = self.violations[0]
        lines = [f"process {pid} wrote the ledger while output of the sink that it wrote was "
                 f"not yet synced (strace output: {self.trace}):", *call.show(),
                 "after:"]
        for earlier, why in pending[:4]:
            lines += [*earlier.show(), f"    ({why})"]
        if len(pending) > 4:
            lines.append(f"  and {len(pending) - 4} more unsynced outputs")
        processes = sorted({v[0] for v in self.violations})
        lines.append(f"{len(self.violations)} of the {self.ledger_writes} ledger writes of worker "
                     f"processes broke the rule, in processes {processes}; {self.records} "
                     "followed output of the sink")
        return "\n".join(lines)


PARTITIONS = 600  # ten records each: with 2 CPUs, packs of 10 partitions, claimed in chunks
SINKS = {
    "sqlite": 'use = "sqlite"\npath = "out/sq.db"\ntable = "sq"\n',
    "sqlite-no-wal": 'use = "sqlite"\npath = "out/sq.db"\ntable = "sq"\nwal = false\n',
    "jsonl-merge": 'use = "jsonl"\npath = "out/parts"\nmerge = "out/all.jsonl"\n',
    "csv-merge": 'use = "csv"\npath = "out/parts"\nmerge = "out/all.csv"\n',
    "sqlite-replace": 'use = "sqlite"\npath = "out/sq.db"\ntable = "sq"\nmode = "replace"\n',
    "jsonl-replace": 'use = "jsonl"\npath = "out/parts"\nmerge = "out/all.jsonl"\n'
                     'mode = "replace"\n',
}


def strace_works() -> bool:
    return subprocess.run(["strace", "-qq", "-e", "trace=none", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("sink", SINKS)
def test_the_ledger_records_output_only_after_the_sink_synced_it(tmp_path, sink):
    require(shutil.which("strace") is not None, "strace is not installed")
    require(strace_works(), "strace cannot trace processes here (ptrace is not allowed)")
    project = tmp_path / "project"
    write(project / "runex.toml", 'extensions = ["extensions"]\n')
    (project / "extensions").mkdir()
    write(project / "pipelines" / "p.toml",
          f'[source]\nuse = "range"\nstop = {PARTITIONS * 10}\nsize = 10\n\n'
          f"[sink]\n{SINKS[sink]}")
    trace = tmp_path / "strace.txt"
    result = subprocess.run(
        ["strace", "-f", "-y", "-qq", "-e", f"trace={TRACED}", "-o", str(trace),
         sys.executable, "-m", "runex", "run", "pipelines/p.toml", "-w", "2"],
        cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr  # 0: the run succeeded

    real = os.path.realpath(project)
    out = os.path.join(real, "out")
    spec = (Sink(database=os.path.join(out, "sq.db"), wal=sink != "sqlite-no-wal")
            if sink.startswith("sqlite")
            else Sink(parts=os.path.join(out, "parts"),
                      merge=os.path.join(out, f"all.{sink.split('-')[0]}")))
    ledger = os.path.join(real, ".runex", "ledger.db")
    check = Check(trace, spec, (ledger, ledger + "-wal")).run(parse(trace), real)
    assert check.sink_writes > 0, f"no output of the sink in a worker process in {trace}"
    assert check.ledger_writes > 0, f"no ledger write in a worker process in {trace}"
    # One ledger write checked per chunk: fewer than one per partition (several partitions
    # per chunk), yet some.
    assert 0 < check.records < PARTITIONS, (check.records, trace)
    assert check.most > 1, (check.most, trace)
    if check.violations:
        pytest.fail(check.report(), pytrace=False)


# -- a kill at any moment leaves every database whole -----------------------------------------

SEED = 20261128
KILLS = 3


def consumer(project: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "2",
                             "--profile", "fast"], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def query(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Read without writing: a read-only connection neither checkpoints nor removes a WAL."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def succeeded(ledger: Path) -> int:
    return query(ledger, "SELECT COUNT(*) FROM partitions WHERE status = 'succeeded'")[0][0]


def committed_and_running(ledger: Path, before: int, since: float) -> bool:
    """A consumer started at `since` committed a partition and is running one now."""
    return succeeded(ledger) > before and bool(query(
        ledger, "SELECT 1 FROM attempts WHERE status = 'running' AND started_at >= ?", (since,)))


@pytest.mark.slow
def test_a_kill_at_a_random_moment_leaves_every_database_whole(project):
    # 300 partitions of 20 records, 2 ms each: about 6 s of work for two workers.
    work_pipeline(project, stop=6000, size=20, options="quarantine_after = 10\n", pause=0.002)
    runex_cli("submit", "pipelines/p.toml", cwd=project, check=True)
    home = project / ".runex"
    ledger, sink = home / "ledger.db", project / "out" / "sq.db"
    databases = [ledger, home / "queue.db", sink]
    rng = random.Random(SEED)
    for kill in range(1, KILLS + 1):
        before, started = succeeded(ledger), time.time()
        proc = consumer(project)
        try:
            wait_for(partial(committed_and_running, ledger, before, started))
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the consumer, its workers, their threads
            proc.wait(timeout=30)
        for db in databases:
            assert query(db, "PRAGMA integrity_check") == [("ok",)], (
                f"{db} after kill {kill} (seed {SEED})")
        assert succeeded(ledger) < 300, "the run ended before the kill: make it longer"

    runex_cli("worker", "--burst", "-w", "2", "--profile", "fast", cwd=project, timeout=60,
              check=True)
    for db in databases:
        assert query(db, "PRAGMA integrity_check") == [("ok",)], db
    assert query(ledger, "SELECT status FROM runs") == [("succeeded",)]
    assert query(sink, "SELECT COUNT(*), COUNT(DISTINCT n) FROM sq") == [(6000, 6000)]
    assert query(sink, "SELECT COUNT(*) FROM _runex_commits") == [(300,)]
    lost = query(ledger, "SELECT COUNT(*) FROM attempts WHERE status = 'lost'")[0][0]
    assert lost > 0, "the kills hit no running partition"


# -- what a command acknowledges is synced before it says so ----------------------------------

def acknowledged_unsynced(trace: Path, ledger: str) -> tuple[int, list[str]]:
    """(ledger syncs, problems) of the process strace started: a write to stdout while its
    writes to the ledger were not yet synced is a problem."""
    calls = parse(trace)
    root = calls[0].tid
    syncs, dirty, problems = 0, None, []  # dirty: the first ledger write since a sync
    for call in sorted((c for c in calls if c.tid == root and order(c) is not None), key=order):
        if call.result is not None and call.result < 0:
            continue
        path = descriptor_path(call)
        if call.name in WRITES and path in (ledger, ledger + "-wal"):
            dirty = dirty or call
        elif call.name in SYNCS and path in (ledger, ledger + "-wal"):
            syncs, dirty = syncs + 1, None
        elif call.name in WRITES and call.args.startswith("1<") and call.result and dirty:
            problems += [*call.show(), "was printed after this unsynced ledger write:",
                         *dirty.show()]
    return syncs, problems


@pytest.mark.slow
def test_submit_cancel_and_retry_sync_the_ledger_before_they_answer(project, tmp_path):
    require(shutil.which("strace") is not None, "strace is not installed")
    require(strace_works(), "strace cannot trace processes here (ptrace is not allowed)")
    work_pipeline(project, stop=30, size=10)
    ledger = os.path.join(os.path.realpath(project), ".runex", "ledger.db")
    run_id = None
    for command in (["submit", "pipelines/p.toml"], ["cancel", "last"], ["retry", "last"]):
        trace = tmp_path / f"{command[0]}.txt"
        result = subprocess.run(
            ["strace", "-f", "-y", "-qq", "-e", f"trace={TRACED}", "-o", str(trace),
             sys.executable, "-m", "runex", *command], cwd=project, capture_output=True,
            text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        run_id = run_id or result.stdout.strip()
        assert run_id in result.stdout or command[0] == "retry", result.stdout
        syncs, problems = acknowledged_unsynced(trace, ledger)
        assert syncs > 0, f"`runex {command[0]}` never synced the ledger ({trace})"
        assert not problems, "\n".join([f"`runex {command[0]}`:", *problems])
