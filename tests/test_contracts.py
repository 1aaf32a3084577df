"""asyncflow.runtime.contracts: declared dtypes and the output check every operator passes."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from asyncflow.errors import AsyncflowError, OperatorError
from asyncflow.runtime.contracts import _SCALARS, arrow_type, check_output, dtype_name

OP = "scorer"
WRITES = {"reward": "float32", "tokens": "list<int32>", "logp": "list<float32>"}
IDS = [10, 11, 12]


def good_columns() -> dict[str, pa.Array]:
    return {
        # deliberately not in declared order
        "logp": pa.array([[-0.5], [], [-1.0, -2.0]], pa.list_(pa.float32())),
        "reward": pa.array([1.0, 0.0, 0.5], pa.float32()),
        "tokens": pa.array([[3], [], [4, 2]], pa.list_(pa.int32())),
    }


def raises_operator_error(writes, output, ids=IDS) -> OperatorError:
    with pytest.raises(OperatorError) as info:
        check_output(OP, writes, output, ids)
    err = info.value
    assert isinstance(err, AsyncflowError)
    assert err.operator == OP
    assert str(err).startswith(f"operator {OP!r}: ")
    return err


# --- accepted outputs ------------------------------------------------------------------------


def test_dict_output_becomes_record_batch_in_declared_order():
    out = check_output(OP, WRITES, good_columns(), IDS)
    assert isinstance(out, pa.RecordBatch)
    assert out.schema.names == ["reward", "tokens", "logp"]
    assert out.schema.types == [pa.float32(), pa.list_(pa.int32()), pa.list_(pa.float32())]
    assert out.num_rows == 3
    assert out.column("reward").to_pylist() == [1.0, 0.0, 0.5]
    assert out.column("tokens").to_pylist() == [[3], [], [4, 2]]
    assert out.column("logp").to_pylist() == [[-0.5], [], [-1.0, -2.0]]


def test_record_batch_and_table_outputs_are_accepted():
    batch = pa.RecordBatch.from_pydict(good_columns())
    out = check_output(OP, WRITES, batch, IDS)
    assert out.schema.names == ["reward", "tokens", "logp"]
    table = pa.Table.from_batches([batch.slice(0, 1), batch.slice(1, 2)])  # two chunks
    out = check_output(OP, WRITES, table, IDS)
    assert isinstance(out, pa.RecordBatch)
    assert out.column("tokens").to_pylist() == [[3], [], [4, 2]]


def test_non_arrow_values_are_converted():
    out = check_output(OP, {"n": "int64", "s": "string"}, {"n": [1, 2], "s": ["a", "b"]}, [0, 1])
    assert out.schema.types == [pa.int64(), pa.string()]
    out = check_output(OP, {"x": "float64"}, {"x": np.array([0.5, 1.5])}, [0, 1])
    assert out.column("x").to_pylist() == [0.5, 1.5]


def test_undeclared_dtype_accepts_any_type():
    out = check_output(OP, {"anything": None}, {"anything": pa.array([1.5, 2.5])}, [0, 1])
    assert out.schema.types == [pa.float64()]


def test_no_writes_and_no_output():
    for output in (None, {}):
        out = check_output("actor", {}, output, [0, 1])
        assert isinstance(out, pa.RecordBatch)
        assert out.num_columns == 0


# --- rejected outputs ------------------------------------------------------------------------


def test_missing_column():
    columns = good_columns()
    del columns["tokens"]
    err = raises_operator_error(WRITES, columns)
    assert "missing declared column(s) ['tokens']" in str(err)
    assert "[samples 10, 11, 12]" in str(err)
    assert err.sample_ids == IDS


def test_none_output_is_missing_every_column():
    err = raises_operator_error({"reward": "float32"}, None)
    assert "missing declared column(s) ['reward']" in str(err)


def test_extra_column():
    columns = good_columns() | {"debug": pa.array([1, 2, 3])}
    err = raises_operator_error(WRITES, columns)
    assert "returned undeclared column(s) ['debug']" in str(err)
    assert "missing" not in str(err)
    assert err.sample_ids == IDS


def test_missing_and_extra_reported_together():
    columns = good_columns()
    del columns["reward"]
    columns["rewrd"] = pa.array([1.0, 0.0, 0.5], pa.float32())
    err = raises_operator_error(WRITES, columns)
    assert "missing declared column(s) ['reward']" in str(err)
    assert "returned undeclared column(s) ['rewrd']" in str(err)


def test_wrong_row_count():
    columns = good_columns() | {"reward": pa.array([1.0, 0.0], pa.float32())}
    err = raises_operator_error(WRITES, columns)
    assert "column 'reward' has 2 rows for 3 input rows" in str(err)
    assert err.sample_ids == IDS
    assert "10, 11, 12" in str(err)


@pytest.mark.parametrize(
    ("column", "array", "got", "declared"),
    [
        ("reward", pa.array([1.0, 0.0, 0.5], pa.float64()), "float64", "float32"),
        ("tokens", pa.array([[3], [], [4, 2]], pa.list_(pa.int64())), "list<int64>", "list<int32>"),
        ("tokens", pa.array([3, 1, 4], pa.int32()), "int32", "list<int32>"),
    ],
)
def test_wrong_dtype(column, array, got, declared):
    err = raises_operator_error(WRITES, good_columns() | {column: array})
    assert f"column {column!r} has dtype {got}, declared {declared}" in str(err)
    assert err.sample_ids == IDS


def test_nan_in_float_column_names_bad_rows():
    columns = good_columns() | {"reward": pa.array([1.0, float("nan"), np.inf], pa.float32())}
    err = raises_operator_error(WRITES, columns)
    assert "column 'reward' holds NaN or inf" in str(err)
    assert err.sample_ids == [11, 12]
    assert str(err).endswith("[samples 11, 12]")


def test_nan_inside_list_column_names_exactly_the_bad_rows():
    ids = [5, 6, 7, 8, 9]
    logp = pa.array(
        [[-0.1], [], [-0.2, float("nan")], [-0.3], [float("-inf"), -0.4, float("nan")]],
        pa.list_(pa.float32()),
    )
    err = raises_operator_error({"logp": "list<float32>"}, {"logp": logp}, ids)
    assert "column 'logp' holds NaN or inf" in str(err)
    assert err.sample_ids == [7, 9]  # rows 2 and 4, each once


def test_nan_inside_sliced_list_column():
    # A slice has a non-zero offset: the bad row must still map to its own sample id.
    base = pa.array([[float("nan")], [0.5], [], [1.0, float("nan")]], pa.list_(pa.float32()))
    err = raises_operator_error({"logp": "list<float32>"}, {"logp": base.slice(1)}, [20, 21, 22])
    assert err.sample_ids == [22]


def test_finite_check_ignores_int_columns_and_empty_lists():
    out = check_output(
        OP,
        {"logp": "list<float32>", "n": "int32"},
        {"logp": pa.array([[], []], pa.list_(pa.float32())), "n": pa.array([1, 2], pa.int32())},
        [0, 1],
    )
    assert out.num_rows == 2


def test_nan_inside_nested_list_column():
    nested = pa.array([[[0.5]], [[1.0, float("nan")]]], pa.list_(pa.list_(pa.float32())))
    with pytest.raises(OperatorError):
        check_output(OP, {"x": "list<list<float32>>"}, {"x": nested}, [0, 1])


@pytest.mark.parametrize("output", [[1.0, 2.0, 3.0], (1, 2, 3), 3.0, pa.array([1.0, 2.0, 3.0])])
def test_non_mapping_output_is_rejected(output):
    err = raises_operator_error(WRITES, output)
    assert f"returned {type(output).__name__}; return a dict of columns" in str(err)
    assert err.sample_ids == IDS


def test_many_sample_ids_are_abbreviated():
    ids = list(range(100, 115))
    err = raises_operator_error({"x": "float32"}, {}, ids)
    assert "[samples 100, 101, 102, 103, 104, 105, 106, 107, 108, 109 (+5 more)]" in str(err)
    assert err.sample_ids == ids


# --- arrow_type / dtype_name -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bool", pa.bool_()),
        ("int8", pa.int8()),
        ("int32", pa.int32()),
        ("int64", pa.int64()),
        ("float16", pa.float16()),
        ("float32", pa.float32()),
        ("float64", pa.float64()),
        ("string", pa.string()),
        ("binary", pa.binary()),
        ("list<int32>", pa.list_(pa.int32())),
        ("list< float32 >", pa.list_(pa.float32())),
        ("list<list<int64>>", pa.list_(pa.list_(pa.int64()))),
        (" list < list < string > > ", pa.list_(pa.list_(pa.string()))),
    ],
)
def test_arrow_type_parses(text, expected):
    assert arrow_type(text) == expected


@pytest.mark.parametrize(
    "text", ["float128", "int", "list<foo>", "list<int32", "list<>", "", "List<int32>"]
)
def test_arrow_type_rejects_unknown_names(text):
    with pytest.raises(ValueError) as info:
        arrow_type(text)
    message = str(info.value)
    assert message.startswith("unknown column dtype")
    for name in _SCALARS:
        assert name in message
    assert "list<...>" in message


def test_arrow_type_error_quotes_the_unknown_name():
    with pytest.raises(ValueError, match=re.escape("unknown column dtype 'float128'")):
        arrow_type("float128")
    with pytest.raises(ValueError, match=re.escape("unknown column dtype 'foo'")):
        arrow_type("list<foo>")  # the innermost unknown name is quoted


@pytest.mark.parametrize("text", ["int32", "float32", "list<int32>", "list<list<float64>>"])
def test_dtype_name_inverts_arrow_type(text):
    assert dtype_name(arrow_type(text)) == text


def test_dtype_name_falls_back_to_arrow_names():
    assert dtype_name(pa.uint8()) == "uint8"
    assert dtype_name(pa.large_list(pa.int32())) == "list<int32>"
