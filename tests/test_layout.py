"""How the code is arranged: no import cycles, no module state set from elsewhere, every
command documented, and the library behind every command."""

import ast
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from runex import cli
from runex.app import Runex

from .conftest import ROOT

PACKAGE = ROOT / "runex"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every runex module `path` imports when it runs, wherever the import statement is (in
    a function too; not the `if TYPE_CHECKING:` blocks, which only type checkers read):
    `from runex import x` counts as `runex.x` when that is a module."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # drop what only type checkers import
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                   "typing.TYPE_CHECKING"):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= submodules
            if node.module in known and len(submodules) < len(node.names):
                found.add(node.module)  # names defined in the module itself
    return found


def test_no_import_cycle_among_runex_modules():
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycles.append(stack[stack.index(name):] + [name])
            return
        for dep in sorted(graph[name]):
            visit(dep, stack + [name])

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_module_sets_another_modules_globals():
    mods = modules()
    offenders = []
    for path in mods.values():
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name.rsplit(".", 1)[-1]
                   for node in ast.walk(tree) if isinstance(node, ast.ImportFrom | ast.Import)
                   for a in node.names
                   if (getattr(node, "module", None) or "").startswith("runex")
                   or a.name.startswith("runex")}
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign)
                       else [])
            for t in targets:
                if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                        and t.value.id in aliases and f"runex.{t.value.id}" in mods):
                    offenders.append(f"{path.name}:{node.lineno}: {t.value.id}.{t.attr}")
            if isinstance(node, ast.Global):
                offenders.append(f"{path.name}:{node.lineno}: global {', '.join(node.names)}")
    assert not offenders


COMMANDS = sorted(cli.cli.commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme_table(name):
    result = CliRunner().invoke(cli.cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    command = cli.cli.commands[name]
    assert command.help and len(command.help.split()) >= 5, f"{name}: no real help text"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"runex {name} {param.opts[0]}: no help text"
    table = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"`runex {name}\b", table), f"runex {name} is missing from the README"


README = (ROOT / "README.md").read_text()
LIBRARY = {"run", "submit", "wait", "show", "runs", "trace", "cancel", "retry", "backfill",
           "schedules", "extensions", "validate", "work"}


def test_every_command_but_init_and_worker_has_a_runex_method_of_its_name():
    for name in COMMANDS:
        if name == "init":  # before there is a project: `runex.project.init_project`
            continue
        method = "work" if name == "worker" else name
        assert callable(getattr(Runex, method, None)), f"Runex.{method}"
    assert all(callable(getattr(Runex, m)) for m in LIBRARY)


def test_commands_that_need_no_worker_run_in_process(project):
    """A few commands through click's runner: they call the library and print."""
    (project / "p.toml").write_text('[source]\nuse = "range"\nstop = 3\n\n[sink]\nuse = "null"\n')
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["validate", "p.toml"])
    assert result.exit_code == 0 and "source 'range'" in result.output
    result = runner.invoke(cli.cli, ["submit", "p.toml"])
    run_id = result.output.strip()
    assert result.exit_code == 0 and Runex().show(run_id).status == "queued"
    result = runner.invoke(cli.cli, ["runs", "--json"])
    assert result.exit_code == 0 and run_id in result.output
    result = runner.invoke(cli.cli, ["cancel", run_id])
    assert result.exit_code == 0 and "status cancelled" in result.output
    result = runner.invoke(cli.cli, ["show", "nope"])
    assert result.exit_code == 4 and "no run 'nope'" in result.output


def test_small_things_a_person_asked_for(project):
    """Any unique part of a run id; `runs` filters and shows the first error; `cancel` of a
    finished run says so; plurals; `validate --json`."""
    import json

    from .conftest import runex_cli

    (project / "p.toml").write_text('[source]\nuse = "range"\nstop = 3\n\n[sink]\nuse = "null"\n')
    (project / "bad.toml").write_text('[source]\nuse = "rnge"\n\n[sink]\nuse = "null"\n')
    rx = Runex()
    run = rx.run("p.toml", workers=0)
    suffix = run.id.rsplit("-", 1)[1]
    assert rx.show(suffix).id == run.id and rx.show(suffix[2:6]).id == run.id
    other = rx.submit("p.toml")
    result = runex_cli("show", run.id[:8], cwd=project)  # the date: part of both ids
    assert result.returncode == 4 and "is part of more than one run id" in result.stderr
    result = runex_cli("cancel", suffix, cwd=project, check=True)
    assert result.stdout == f"run {run.id} was already over (succeeded); nothing to cancel\n"
    result = runex_cli("cancel", other, cwd=project, check=True)
    assert "1 queued partition cancelled," in result.stdout
    assert runex_cli("retry", other, cwd=project, check=True).stdout.startswith(
        "re-queued 1 partition: 0")
    rows = json.loads(runex_cli("runs", "--json", "--pipeline", "p", "--since", "1h",
                                cwd=project, check=True).stdout)
    assert {r["id"] for r in rows} == {run.id, other}
    assert runex_cli("runs", "--pipeline", "nope", cwd=project, check=True).stdout.count(
        "\n") == 1  # the header only
    assert json.loads(runex_cli("runs", "--json", "--since", "2999-01-01", cwd=project,
                                check=True).stdout) == []
    result = runex_cli("runs", "--since", "yesterday-ish", cwd=project)
    assert result.returncode == 2 and "--since 'yesterday-ish' is neither a time" in result.stderr
    ok = json.loads(runex_cli("validate", "p.toml", "--json", cwd=project, check=True).stdout)
    assert ok["ok"] and ok["pipeline"]["source"]["use"] == "range"
    result = runex_cli("validate", "bad.toml", "--json", cwd=project)
    bad = json.loads(result.stdout)
    assert result.returncode == 3 and not bad["ok"] and "did you mean 'range'" in bad["error"]


def test_runs_shows_the_first_error_of_a_failed_run(project):
    from .conftest import runex_cli, write

    write(project / "extensions" / "k.py", """
        from runex import register_kernel

        @register_kernel("boom")
        def boom(record):
            raise ValueError("no good")
    """)
    (project / "p.toml").write_text('[source]\nuse = "range"\nstop = 3\n\n[[steps]]\n'
                                    'use = "boom"\n\n[sink]\nuse = "null"\n\n'
                                    "[options]\nretries = 0\n")
    assert Runex().run("p.toml", workers=0).status == "failed"
    listing = runex_cli("runs", cwd=project, check=True).stdout
    assert "ERROR" in listing.splitlines()[0]
    assert "partition 0 ([0, 3]): ValueError: no good; 1 of 1 partition…" in listing
