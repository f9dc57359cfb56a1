"""The scenario loader, fuzzed: every generated document loads or is a clean user error.

Hypothesis writes YAML documents that mix the schema's own keys with unicode ones, nest deeply,
carry huge numbers, NaN, wrong types; and raw text that is not YAML at all. Each must either load
into a Scenario or raise FedsimError (the CLI's exit 2 with a message), quickly: never another
exception, never a hang. Through ``fedsim validate`` (in process) the same documents give exit
0 or 2 and a one-line message, never a traceback.
"""

import contextlib
import io

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fedsim.cli import main
from fedsim.errors import FedsimError
from fedsim.scenario import Scenario, load


def schema_keys(model: type[BaseModel], seen: set | None = None) -> set[str]:
    """Every field name of the scenario schema, nested models included."""
    seen = seen if seen is not None else set()
    keys: set[str] = set()
    if model in seen:
        return keys
    seen.add(model)
    for name, field in model.model_fields.items():
        keys.add(name)
        for arg in _types(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                keys |= schema_keys(arg, seen)
    return keys


def _types(annotation):
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [t for a in args for t in _types(a)]


KEYS = sorted(schema_keys(Scenario))
key = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=12))
scalar = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["mobile", "laptop", "cloud", "pathloss", "static", "ofdma", "tdma", "sync",
                     "deadline", "async", "synthetic", "real", "fedavg", "topk", "adaptive",
                     "process", "ray", "inline", "-1", "1e309", "../..", "/etc", "", "ä😀"]),
    st.text(max_size=20),
)
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=5)), max_leaves=30)
document = st.dictionaries(key, value, max_size=10)


def nested(depth: int, leaf) -> dict:
    doc = leaf
    for i in range(depth):
        doc = {KEYS[i % len(KEYS)]: doc} if i % 2 else [doc]
    return {"name": "deep", "clients": doc}


def _write(tmp_path, text: str):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _loads_or_user_error(path) -> None:
    try:
        load(path)
    except FedsimError as e:
        assert str(e).strip(), "an error without a message"


FUZZ = settings(max_examples=500, deadline=5000,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(doc=document)
def test_generated_documents_load_or_fail_cleanly(tmp_path, doc):
    _loads_or_user_error(_write(tmp_path, yaml.safe_dump(doc, allow_unicode=True)))


@settings(max_examples=150, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=st.text(max_size=300))
def test_raw_text_loads_or_fails_cleanly(tmp_path, text):
    _loads_or_user_error(_write(tmp_path, text))


@settings(max_examples=30, deadline=10000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(depth=st.integers(min_value=50, max_value=3000), leaf=scalar)
def test_deep_nesting_fails_cleanly(tmp_path, depth, leaf):
    try:
        text = yaml.safe_dump(nested(depth, leaf))
    except RecursionError:  # too deep for PyYAML's writer: write the flow form by hand
        text = "name: deep\nclients: " + "[" * depth + "1" + "]" * depth + "\n"
    _loads_or_user_error(_write(tmp_path, text))


def test_pathological_texts(tmp_path):
    texts = [
        "[" * 100_000,  # unbalanced, very deep
        "a: &a [*a]\n",  # a self-referencing alias
        "a: &x [1]\nb: [*x, *x, *x, *x, *x, *x, *x, *x]\n" * 3,  # alias fan-out
        "name: x\nrounds: 1" + "0" * 5000 + "\n",  # a 5,000-digit integer
        "name: x\nseed: .nan\n",
        "name: x\nclients: [{profile: mobile, count: 1e400}]\n",
        "\ufeffname: bom\n",
        "name: x\n\x00\n",
        "!!python/object/apply:os.system ['true']\n",  # safe_load refuses to construct it
        "name: x\noutput: {dir: ../../escape}\n",
        "name: x\noutput: {dir: /etc}\n",
    ]
    for text in texts:
        _loads_or_user_error(_write(tmp_path, text))
    # The escapes are refused with the key's path.
    for bad in ("../../escape", "/etc", "runs/../../x"):
        path = _write(tmp_path, f"name: x\nrounds: 1\nclients: [{{profile: laptop, count: 1}}]\n"
                                f"output: {{dir: '{bad}'}}\n")
        try:
            load(path)
            raise AssertionError(f"output.dir {bad!r} accepted")
        except FedsimError as e:
            assert "output.dir" in str(e) and "relative path" in str(e)


@settings(max_examples=100, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=document)
def test_validate_cli_exits_0_or_2_without_a_traceback(tmp_path, doc):
    path = _write(tmp_path, yaml.safe_dump(doc, allow_unicode=True))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path)])
    assert code in (0, 2)
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert err.getvalue().startswith("fedsim: error: ")


def test_no_unsafe_loaders_in_the_package():
    """yaml.safe_load only; torch.load only with weights_only=True; no pickle of files."""
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "fedsim"
    for path in src.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, path.name
        assert "pickle.load" not in text, path.name
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"
