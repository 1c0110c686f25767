import os

import pytest

from runex import PipelineError, Runex, extensions, register_kernel
from runex.errors import DuplicateName, UnknownName
from runex.registry import default_registry

from .conftest import ROOT, write


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def messages(registry):
    return sorted(str(e) for e in registry.errors)


def test_broken_files_are_reported_with_file_and_line_and_the_others_load(at_root):
    registry = extensions.load(["tests/extensions/broken"], builtins=False)
    assert messages(registry) == [
        "tests/extensions/broken/missing_import.py:2: ModuleNotFoundError: "
        "No module named 'runex_no_such_module'",
        "tests/extensions/broken/raises_at_import.py:5: KeyError: 'ratee'",
        "tests/extensions/broken/syntax_error.py:4: SyntaxError: expected ':'",
    ]
    # good.py loads; a file that failed half-way registers nothing ('rated' came before the error)
    assert sorted(registry.kernels) == ["double"]
    assert "Traceback" in registry.errors[0].traceback


def test_a_name_from_a_broken_file_names_that_file(at_root):
    registry = extensions.load(["tests/extensions/broken"], builtins=False)
    with pytest.raises(UnknownName) as info:
        registry.kernel("shout")
    assert "unknown kernel 'shout'" in str(info.value)
    assert "known kernels: double" in str(info.value)
    assert "tests/extensions/broken/missing_import.py" in str(info.value)


def test_same_name_in_two_files_names_both_places(at_root):
    registry = extensions.load(["tests/extensions/dup"], builtins=False)
    assert messages(registry) == [
        "kernel 'clean' is defined twice: tests/extensions/dup/a.py:4 and "
        "tests/extensions/dup/b.py:9; rename one of them"]
    assert registry.kernel("unique_here")
    with pytest.raises(DuplicateName):
        registry.kernel("clean")


def test_unknown_kernel_lists_close_matches_and_known_names():
    registry = extensions.load([])
    registry.add("kernel", "lower", registry.kernels.get("x") or _kernel("lower"))
    registry.add("kernel", "words", _kernel("words"))
    with pytest.raises(UnknownName) as info:
        registry.kernel("lowr")
    assert str(info.value) == ("unknown kernel 'lowr' (did you mean 'lower'?); "
                               "known kernels: lower, words")


def _kernel(name):
    from runex.registry import Kernel
    return Kernel(name, lambda r: r)


def test_decorator_kernels_dict_and_specs_are_discovered(project):
    write(project / "extensions" / "mine.py", """
        from runex import register_kernel, DataSourceSpec, SinkSpec

        @register_kernel("up")
        def up(record):
            return record

        register_kernel("pairs", lambda records: records, batch=True)

        KERNELS = {"same": lambda record: record}

        nums = DataSourceSpec(name="nums", read=lambda partition: iter([{"n": 1}]))
        keep = SinkSpec(name="keep", write=lambda ctx, records: list(records))
        alias = keep  # the same spec under a second module name is not a duplicate
    """)
    registry = extensions.load(["extensions"])
    assert registry.errors == []
    assert registry.kernel("up").origin == "extensions/mine.py:3"
    assert registry.kernel("pairs").batch is True
    assert registry.kernel("same").origin == "extensions/mine.py:9"
    assert registry.source("nums").origin == "extensions/mine.py:11"
    assert registry.sink("keep").origin == "extensions/mine.py:12"
    assert {"csv", "jsonl", "lines", "sqlite", "range"} <= set(registry.sources)
    assert {"sqlite", "jsonl", "csv", "null"} <= set(registry.sinks)


def test_loading_builds_a_fresh_registry_each_time(project):
    write(project / "extensions" / "one.py", """
        from runex import register_kernel
        register_kernel("one", lambda record: record)
    """)
    first = extensions.load(["extensions"])
    os.remove(project / "extensions" / "one.py")
    second = extensions.load(["extensions"])
    assert "one" in first.kernels and "one" not in second.kernels
    assert "one" not in default_registry.kernels


def test_register_kernel_outside_loading_goes_to_the_default_registry():
    def fn(record):
        return record
    register_kernel("test_default_registry_kernel", fn)
    try:
        assert default_registry.kernel("test_default_registry_kernel").fn is fn
    finally:
        del default_registry.kernels["test_default_registry_kernel"]


def test_world_writable_extension_file_is_refused(project):
    path = write(project / "extensions" / "open.py", """
        from runex import register_kernel
        register_kernel("open_kernel", lambda record: record)
    """)
    os.chmod(path, 0o666)
    registry = extensions.load(["extensions"])
    assert messages(registry) == [
        "extensions/open.py: PermissionError: file is writable by every user; refusing to "
        f"load code from it (fix: chmod o-w {path})"]
    assert "open_kernel" not in registry.kernels


def test_world_writable_extension_folder_is_refused(project):
    os.chmod(project / "extensions", 0o777)
    registry = extensions.load(["extensions"])
    assert "folder is writable by every user" in messages(registry)[0]


def test_pipeline_needing_a_broken_file_fails_validation_naming_it(at_root, tmp_path):
    pipeline = write(tmp_path / "p.toml", """
        [source]
        use = "range"
        stop = 10
        [[steps]]
        use = "shout"
        [sink]
        use = "null"
    """)
    rx = Runex(root=ROOT, extensions=["tests/extensions/broken"], home=tmp_path / "home")
    with pytest.raises(PipelineError) as info:
        rx.plan(pipeline)
    assert "steps[0].use: unknown kernel 'shout'" in str(info.value)
    assert "tests/extensions/broken/missing_import.py" in str(info.value)
