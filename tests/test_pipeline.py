import pytest

from runex import PipelineError, Runex
from runex.pipeline import load, parse_duration

from .conftest import write

KERNEL = """
    from runex import register_kernel

    @register_kernel("scale")
    def scale(record, factor, field="n"):
        return {**record, field: record[field] * factor}
"""


@pytest.fixture
def rx(project):
    write(project / "extensions" / "k.py", KERNEL)
    return Runex()


SCALE = """
    [source]
    use = "range"
    stop = 10
    [[steps]]
    use = "scale"
    factor = 2
    {extra}
    [sink]
    use = "null"
"""


def pipeline(project, body):
    return write(project / "pipelines" / "p.toml", body)


def test_unknown_parameter_names_file_key_and_accepted_parameters(rx, project):
    path = pipeline(project, SCALE.format(extra='feild = "n"'))
    with pytest.raises(PipelineError) as info:
        rx.plan(path)
    assert str(info.value) == (
        "pipelines/p.toml: steps[0] (kernel 'scale', extensions/k.py:3): unknown parameter "
        "'feild' (did you mean 'field'?); known parameters: factor, field")


def test_missing_required_parameter_and_several_problems_at_once(rx, project):
    path = pipeline(project, """
        [source]
        use = "range"
        [[steps]]
        use = "scale"
        [sink]
        use = "sqlite"
        path = "out.db"
    """)
    with pytest.raises(PipelineError) as info:
        rx.plan(path)
    text = str(info.value)
    assert text.startswith("pipelines/p.toml: 3 problems:")
    assert "[source] (source 'range', " in text
    assert "missing required parameter 'stop'; it takes: field, size, start, stop" in text
    assert ("steps[0] (kernel 'scale', extensions/k.py:3): "
            "missing required parameter 'factor'") in text
    assert "[sink] (sink 'sqlite', " in text and "missing required parameter 'table'" in text


def test_unknown_names_list_close_matches(rx, project):
    path = pipeline(project, """
        [source]
        use = "rnage"
        stop = 1
        [sink]
        use = "nul"
    """)
    with pytest.raises(PipelineError) as info:
        rx.plan(path)
    assert "source.use: unknown source 'rnage' (did you mean 'range'?); known sources: " \
           "csv, jsonl, lines, postgres, range, sqlite" in str(info.value)
    assert "sink.use: unknown sink 'nul' (did you mean 'null'?)" in str(info.value)


def test_malformed_toml_names_file_and_line(project):
    path = pipeline(project, """
        [source]
        use = "range"
        stop = = 3
    """)
    with pytest.raises(PipelineError) as info:
        load(path)
    assert str(info.value).startswith("pipelines/p.toml: invalid TOML: ")
    assert "line 3" in str(info.value)


def test_missing_sections_and_unknown_options(project):
    with pytest.raises(PipelineError, match=r"p.toml: the \[sink\] section is missing"):
        load(pipeline(project, '[source]\nuse = "range"\n'))
    retrys = r"unknown option 'retrys' \(did you mean 'retries'\?\)"
    with pytest.raises(PipelineError, match=retrys):
        load(pipeline(project, '[source]\nuse="range"\n[sink]\nuse="null"\n[options]\nretrys=1\n'))
    with pytest.raises(PipelineError, match="options.timeout: 'soon' is not a duration"):
        load(pipeline(project, '[source]\nuse="range"\n[sink]\nuse="null"\n'
                               '[options]\ntimeout="soon"\n'))


def test_overrides_set_nested_values_typed_as_toml(project):
    path = pipeline(project, SCALE.format(extra=""))
    p = load(path, ["source.stop=25", "steps.0.factor=1.5", "steps.0.field=m",
                    "options.retries=4"])
    assert p.source.params == {"stop": 25}
    assert p.steps[0].params == {"factor": 1.5, "field": "m"}
    assert p.options.retries == 4
    with pytest.raises(PipelineError, match="steps has no item 3"):
        load(path, ["steps.3.factor=1"])
    with pytest.raises(PipelineError, match="write key.path=value"):
        load(path, ["source.stop"])


def test_durations():
    assert parse_duration("10m", "x") == 600
    assert parse_duration("1h30m", "x") == 5400
    assert parse_duration("250ms", "x") == 0.25
    assert parse_duration(3, "x") == 3.0
    with pytest.raises(PipelineError):
        parse_duration("-1s", "x")


def test_invalid_pipeline_stores_nothing(rx, project):
    path = pipeline(project, '[source]\nuse="range"\nstop=3\n[sink]\nuse="nope"\n')
    with pytest.raises(PipelineError):
        rx.submit(path)
    assert rx.ledger.runs() == []
    assert rx.huey.pending_count() == 0
