import datetime as dt
import math
import random
import tomllib

import pytest

from handforge.toml_writer import dump, dumps


def same(a, b) -> bool:
    """Equality (key order aside) that also tells bool from int, int from float and -0.0 from 0.0, and lets nan == nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)  # TOML moves sections last
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def roundtrip(data):
    return tomllib.loads(dumps(data))


RECIPE = {
    "name": "quickstart",
    "seed": 0,
    "description": 'A "quoted" recipe\\with a backslash,\ttab, newline\nand unicode: é 手 🖐',
    "plugins": ["local/my_plugin.py"],
    "train": {"steps": 200, "batch_size": 16, "lr": 2e-4, "betas": [0.0, 0.99], "amp": False,
              "ema": {"decay": 0.999, "start": 1000}},
    "data": {"dataset": {"name": "procedural_hands", "size": 64, "handshapes": ["fist", "palm", "ok"],
                         "options": {}}},
    "model": {
        "generator": {"name": "deep_conv", "ch": 64, "conditioner": {"name": "spade"}},
        "discriminator": {"name": "deep_conv", "ch": 64, "sn": True},
    },
    "losses": [{"name": "hinge", "weight": 1.0}, {"name": "logistic_r1", "weight": 10.0, "every": 16}],
    "eval": {
        "every": 500,
        "metrics": [
            {"name": "fid", "n": 5000, "stats": {"path": "C:\\stats\\fid.npz"}},
            {},
            {"name": "pck", "thresholds": [0.05, 0.1, 0.2], "per_joint": [{"j": 0}, {"j": 1}]},
        ],
    },
    "floats": {"tiny": 1e-20, "tenth": 0.1, "third": 1 / 3, "big": 1e300, "huge_int_like": 1e16,
               "neg_zero": -0.0, "inf": math.inf, "ninf": -math.inf, "nan": math.nan, "max": 1.7976931348623157e308,
               "denormal": 5e-324},
    "ints": {"zero": 0, "neg": -7, "min": -(2 ** 63), "max": 2 ** 63 - 1},
    "keys": {"a.b": 1, "with space": 2, "": 3, "ключ": 4, 'quo"te': 5, "back\\slash": 6, "tab\there": 7,
             "123": 8, "-dash_ok": 9, "sub.table": {"x y": {"": {}}}},
    "nested_arrays": {"grid": [[1, 2], [3, 4, 5], []], "mixed": [1, "two", 3.0, True, [False], {"k": "v", "e": {}}],
                      "long": list(range(100)), "dicts_in_lists": [[{"a": 1}], [{"b": [{"c": 2}]}]]},
    "when": {"stamp": dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc),
             "local": dt.datetime(2024, 5, 6, 7, 8, 9), "day": dt.date(2024, 2, 29), "time": dt.time(23, 59, 1, 5)},
    "empty_table": {},
    "empty_list": [],
}


def test_recipe_round_trips():
    text = dumps(RECIPE)
    assert same(tomllib.loads(text), RECIPE)
    # Layout: scalars before sections, arrays of tables, headers only where needed.
    assert text.startswith('name = "quickstart"\n')
    assert "[[eval.metrics]]" in text and "[[losses]]" in text
    assert "[model.generator.conditioner]" in text
    assert "\n[model]\n" not in text  # created implicitly by its sub-tables
    assert "\n[empty_table]\n" in text or text.endswith("[empty_table]\n")
    assert "lr = 0.0002\n" in text and "tiny = 1e-20\n" in text and "tenth = 0.1\n" in text
    assert "amp = false\n" in text and "sn = true\n" in text


def test_special_floats_and_exact_reprs():
    values = [0.1, 0.2, 1e-20, 1e16, 1e22, 123456789.123, 2.0 ** -1074, -0.0, 1.0, -1.5]
    back = roundtrip({"v": values, "inf": math.inf, "ninf": -math.inf, "nan": math.nan})
    assert same(back["v"], values)
    assert back["inf"] == math.inf and back["ninf"] == -math.inf and math.isnan(back["nan"])


def test_awkward_strings():
    strings = ["", '"', "\\", "'", "'''", '"""', "\x00\x01\x1f\x7f", "\r\n", "\u0085\u2028\ufeff", "😀 手", "#not a comment",
               "a = b", "[not.a.table]"]
    data = {s if s else "empty": s for s in strings}
    assert same(roundtrip(data), data)


def test_tuples_are_arrays():
    assert roundtrip({"t": (1, (2, 3)), "tt": ({"a": 1}, {"a": 2})}) == {"t": [1, [2, 3]], "tt": [{"a": 1}, {"a": 2}]}


def test_none_names_its_key_path():
    with pytest.raises(TypeError, match=r"eval\.metrics\[1\]\.n"):
        dumps({"eval": {"metrics": [{"n": 1}, {"n": None}]}})
    with pytest.raises(TypeError, match=r'"a\.b"\.c\[2\]'):
        dumps({"a.b": {"c": [1, 2, None]}})


def test_unsupported_values():
    with pytest.raises(TypeError, match="x"):
        dumps({"x": object()})
    with pytest.raises(TypeError):
        dumps({1: "non-string key"})
    with pytest.raises(ValueError, match="64-bit"):
        dumps({"big": 2 ** 63})
    with pytest.raises(ValueError, match="Unicode"):
        dumps({"s": "\ud800"})
    with pytest.raises(TypeError):
        dumps(["not", "a", "table"])


def test_empty_document():
    assert dumps({}) == ""
    assert roundtrip({}) == {}


def test_dump_is_atomic(tmp_path):
    path = dump(RECIPE, tmp_path / "run" / "recipe.toml")
    assert path == tmp_path / "run" / "recipe.toml"
    assert same(tomllib.loads(path.read_text("utf-8")), RECIPE)
    assert sorted(p.name for p in path.parent.iterdir()) == ["recipe.toml"]


# --- property-style: random nested structures ------------------------------------------------

KEY_ALPHABET = "abcXYZ019_-. \"'\\\t\n=[]#é手😀\x00\x7f"
STRING_ALPHABET = KEY_ALPHABET + "\r\b\f\x1b\u0085\u2028\ufeff{},"


def random_key(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(["name", "a", "b_c", "x-1", "42", "metrics", "a.b", "", "with space"])
    return "".join(rng.choice(KEY_ALPHABET) for _ in range(rng.randint(0, 6)))


def random_scalar(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return "".join(rng.choice(STRING_ALPHABET) for _ in range(rng.randint(0, 12)))
    if kind == 1:
        return rng.choice([0, 1, -1, 2 ** 63 - 1, -(2 ** 63), rng.randint(-10 ** 12, 10 ** 12)])
    if kind == 2:
        return rng.choice([0.1, 1e-20, -0.0, 0.0, math.inf, -math.inf, math.nan, 5e-324, 1e308,
                           rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randint(-300, 300)])
    if kind == 3:
        return rng.random() < 0.5
    if kind == 4:
        return dt.date(rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28))
    return struct_float(rng)


def struct_float(rng: random.Random) -> float:
    import struct
    while True:  # any finite double, bit pattern drawn uniformly
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(value):
            return value


def random_value(rng: random.Random, depth: int):
    roll = rng.random()
    if depth <= 0 or roll < 0.45:
        return random_scalar(rng)
    if roll < 0.65:
        return random_table(rng, depth - 1)
    if roll < 0.8:  # array of tables
        return [random_table(rng, depth - 1) for _ in range(rng.randint(1, 3))]
    return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 4))]  # any array, maybe nested/mixed


def random_table(rng: random.Random, depth: int) -> dict:
    return {random_key(rng): random_value(rng, depth) for _ in range(rng.randint(0, 5))}


@pytest.mark.parametrize("seed", range(200))
def test_random_structures_round_trip(seed):
    rng = random.Random(seed)
    data = random_table(rng, depth=4)
    text = dumps(data)
    assert same(tomllib.loads(text), data), text
