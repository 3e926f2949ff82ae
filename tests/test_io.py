"""covariant._io: the JSON sanitizer and the atomic writers."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from covariant._io import (
    atomic_save_torch,
    atomic_savez,
    atomic_write,
    atomic_write_json,
    dumps_json,
    loads_json,
    read_json,
    to_jsonable,
)


def _refuse(name):
    raise AssertionError(f"not strict JSON: {name}")


def strict_loads(text):
    """A strict JSON parser: NaN, Infinity and -Infinity are refused."""
    return json.loads(text, parse_constant=_refuse)


class _Result:
    def to_dict(self):
        return {"value": torch.tensor(2.0), "stderr": None}


def test_to_jsonable_converts_everything():
    x = {1: (torch.tensor([1.0, 2.0]), np.arange(2), np.float64(0.5), np.bool_(True)),
         "r": _Result(), "s": "text", "n": None}
    assert to_jsonable(x) == {"1": [[1.0, 2.0], [0, 1], 0.5, True],
                              "r": {"value": 2.0, "stderr": None}, "s": "text", "n": None}
    with pytest.raises(TypeError, match="set"):
        to_jsonable({1, 2})


def test_non_finite_floats_kept_or_nulled(tmp_path):
    x = {"a": [math.inf, -math.inf, math.nan, 1.5], "t": torch.tensor(float("nan"))}
    kept = to_jsonable(x)
    assert kept["a"][:2] == [math.inf, -math.inf] and math.isnan(kept["a"][2])
    assert to_jsonable(x, nonfinite="null") == {"a": [None, None, None, 1.5], "t": None}
    assert json.loads(dumps_json(x, nonfinite="null")) == {"a": [None, None, None, 1.5],
                                                           "t": None}
    # files are strict JSON: the non-finite numbers are null and flagged, and read back as is
    text = atomic_write_json(tmp_path / "k.json", x).read_text()
    back = strict_loads(text)
    assert back == {"a": [None, None, None, 1.5], "t": None,
                    "nonfinite": {"/a/0": "inf", "/a/1": "-inf", "/a/2": "nan", "/t": "nan"}}
    again = read_json(tmp_path / "k.json")
    assert again["a"][:2] == [math.inf, -math.inf] and math.isnan(again["a"][2])
    assert again["a"][3] == 1.5 and math.isnan(again["t"]) and set(again) == {"a", "t"}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, lambda fh: fh.write(b"old"))

    def broken(fh):
        fh.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(path.parent)) == ["f.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_npz_and_torch_writers(tmp_path):
    p = atomic_savez(tmp_path / "a.npz", x=np.arange(3))
    with np.load(p) as f:
        assert f["x"].tolist() == [0, 1, 2]
    q = atomic_save_torch(tmp_path / "t.pt", {"w": torch.ones(2)})
    assert torch.equal(torch.load(q, weights_only=True)["w"], torch.ones(2))


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    import os
    import time

    from covariant._io import STALE_TMP_SECONDS, atomic_write_text

    target = tmp_path / "result.json"
    stale = tmp_path / ".result.json.abc123.tmp"  # what a kill -9 during a write leaves
    fresh = tmp_path / ".result.json.def456.tmp"  # a writer that is still running
    other = tmp_path / ".other.json.xyz.tmp"  # another file's writer: not ours to touch
    for f in (stale, fresh, other):
        f.write_text("partial")
    old = time.time() - 2 * STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    assert not stale.exists() and fresh.exists() and other.exists()
    # the written file has the umask default mode, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


# --------------------------------------------------------------------------------------------
# issue 10: strict JSON everywhere, null plus a flag, read back to the same floats
# --------------------------------------------------------------------------------------------


def test_flagged_nonfinite_round_trip_through_the_strict_writer():
    doc = {"parts": {"prior": {"log_evidences": [-3.5, -math.inf, 2.0],
                               "a/b~c": {"x": math.inf}}},
           "t": torch.tensor([1.0, float("-inf")]), "rows": [{"v": math.nan}], "s": "-inf"}
    text = dumps_json(doc)
    raw = strict_loads(text)                        # strict: no -Infinity in the text
    assert raw["parts"]["prior"]["log_evidences"] == [-3.5, None, 2.0]
    assert raw["nonfinite"] == {"/parts/prior/log_evidences/1": "-inf",
                                "/parts/prior/a~1b~0c/x": "inf",    # RFC 6901 escapes
                                "/t/1": "-inf", "/rows/0/v": "nan"}
    back = loads_json(text)
    assert back["parts"] == {"prior": {"log_evidences": [-3.5, -math.inf, 2.0],
                                       "a/b~c": {"x": math.inf}}}
    assert back["t"] == [1.0, -math.inf] and math.isnan(back["rows"][0]["v"])
    assert back["s"] == "-inf" and "nonfinite" not in back   # a string stays a string
    assert dumps_json(back) == text                   # idempotent


def test_the_one_writer_never_writes_nan_or_infinity():
    x = {"a": [math.inf, 1.0], "b": np.float64("nan")}
    for policy, expect in (("null", {"a": [None, 1.0], "b": None}),
                           ("string", {"a": ["inf", 1.0], "b": "nan"})):
        assert strict_loads(dumps_json(x, nonfinite=policy)) == expect
    with pytest.raises(ValueError, match="non-finite number inf at /a/0"):
        dumps_json(x, nonfinite="error")
    with pytest.raises(ValueError, match="strict JSON"):
        dumps_json(x, nonfinite="keep")
    with pytest.raises(ValueError, match="wrap the data in a dict"):
        dumps_json([1.0, math.inf])
    with pytest.raises(ValueError, match="reserved"):
        dumps_json({"nonfinite": 1, "x": math.nan})
    assert strict_loads(dumps_json([1.0, 2.0])) == [1.0, 2.0]   # nothing to flag: any root
    assert "nonfinite" not in dumps_json({"x": 1.0})             # the key only when needed


def test_the_reader_refuses_the_old_extensions_and_bad_flags():
    with pytest.raises(ValueError, match="not strict JSON: -Infinity"):
        loads_json('{"a": -Infinity}')
    with pytest.raises(ValueError, match="does not point at a null"):
        loads_json('{"a": 1.0, "nonfinite": {"/a": "inf"}}')
    with pytest.raises(ValueError, match="bad non-finite flag"):
        loads_json('{"a": [null], "nonfinite": {"/a/3": "inf"}}')
