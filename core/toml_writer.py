"""A small TOML writer: the inverse of ``tomllib.loads`` for plain nested data.

``dumps(data)`` serializes a dict of str / int / float / bool / datetime / list / tuple / dict so
that ``tomllib.loads(dumps(data)) == data`` (tuples come back as lists). Layout, per table: its
key/value pairs first (scalars, arrays, inline tables inside arrays), then its sub-tables as
``[a.b]`` sections and its lists of dicts as ``[[a.b]]`` arrays of tables, in insertion order. A
table whose only content is sub-sections gets no header of its own (TOML creates it implicitly);
an empty table gets a bare header so that it survives the round trip.

TOML has no null: a None value raises TypeError naming its key path, as does any other type
without a TOML form. Integers outside the signed 64-bit range, strings that are not valid
Unicode (lone surrogates) and date-times TOML cannot express raise ValueError.
"""
from __future__ import annotations

import datetime as _dt
import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path

from .fileio import atomic_write_bytes

__all__ = ["dumps", "dump"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}
# Characters a basic string may not hold literally: controls other than tab, DEL, quote, backslash.
_NEEDS_ESCAPE = re.compile(r'[\x00-\x08\x0a-\x1f\x7f"\\\t]')
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_WRAP = 88  # an array longer than this on one line is wrapped over several lines


def dumps(data: Mapping) -> str:
    """Serialize a mapping with string keys to a TOML document."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a TOML document is a table (dict), got {type(data).__name__}")
    lines: list[str] = []
    _write_table(lines, data, (), header=None, path="")
    return "\n".join(lines).strip("\n") + "\n" if lines else ""


def dump(data: Mapping, path) -> Path:
    """Write ``dumps(data)`` to ``path`` (UTF-8) atomically: a temporary file beside it, renamed
    into place. Parent folders are created. Returns the path."""
    text = dumps(data)
    return atomic_write_bytes(path, text.encode("utf-8"))


# --- tables -------------------------------------------------------------------------------------

def _is_table_array(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, Mapping) for v in value)


def _join(path: str, key: str) -> str:
    key = _key(key, path)
    return f"{path}.{key}" if path else key


def _write_table(lines: list, table: Mapping, keys: tuple, header: str | None, path: str) -> None:
    """Append ``table``'s section. ``keys`` is its header (quoted key parts), ``header`` the
    bracketed header line to emit ("[a.b]" / "[[a.b]]"), or None for the root; ``path`` names it
    in error messages."""
    pairs, sections = [], []
    for key, value in table.items():
        if isinstance(value, Mapping) or _is_table_array(value):
            sections.append((key, value))
        else:
            pairs.append((key, value))
    # A plain table that only holds sections is created implicitly by their headers; an array
    # element ([[...]]) or an empty table needs its own header.
    if header is not None and (pairs or not sections or header.startswith("[[")):
        if lines:
            lines.append("")
        lines.append(header)
    for key, value in pairs:
        lines.append(f"{_key(key, path)} = {_value(value, _join(path, key), multiline=True)}")
    for key, value in sections:
        sub_keys = keys + (_key(key, path),)
        dotted = ".".join(sub_keys)
        sub_path = _join(path, key)
        if isinstance(value, Mapping):
            _write_table(lines, value, sub_keys, f"[{dotted}]", sub_path)
        else:
            for i, element in enumerate(value):
                _write_table(lines, element, sub_keys, f"[[{dotted}]]", f"{sub_path}[{i}]")


# --- keys and values ----------------------------------------------------------------------------

def _key(key, path: str) -> str:
    if not isinstance(key, str):
        where = f" in '{path}'" if path else ""
        raise TypeError(f"TOML keys are strings; got {type(key).__name__} key {key!r}{where}")
    return key if _BARE_KEY.fullmatch(key) else _string(key, path or "<root>")


def _string(text: str, path: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"'{path}': string is not valid Unicode ({error.reason})") from None

    def escape(match):
        char = match.group()
        return _ESCAPES.get(char) or f"\\u{ord(char):04X}"

    return '"' + _NEEDS_ESCAPE.sub(escape, text) + '"'


def _float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(float(value))  # shortest text that reads back to the same double
    return text if ("." in text or "e" in text) else text + ".0"


def _datetime(value, path: str) -> str:
    if isinstance(value, _dt.time) and value.tzinfo is not None:
        raise ValueError(f"'{path}': TOML has no time of day with a time zone")
    offset = value.utcoffset() if isinstance(value, _dt.datetime) else None
    if offset is not None and offset % _dt.timedelta(minutes=1):
        raise ValueError(f"'{path}': TOML time zone offsets are whole minutes, got {offset}")
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _value(value, path: str, multiline: bool = False) -> str:
    if value is None:
        raise TypeError(f"'{path}' is None, and TOML has no null: leave the key out or give a value")
    if isinstance(value, str):
        return _string(value, path)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"'{path}': integer {value} is outside TOML's signed 64-bit range")
        return str(value)
    if isinstance(value, numbers.Real):
        return _float(float(value))
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return _datetime(value, path)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = (f"{_key(k, path)} = {_value(v, _join(path, k))}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"  # inline tables stay on one line
    if isinstance(value, (list, tuple)):
        items = [_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
        one_line = "[" + ", ".join(items) + "]"
        if not multiline or len(items) < 2 or len(one_line) <= _WRAP:
            return one_line
        rows, row = [], ""
        for item in items:  # pack elements into rows of at most _WRAP characters
            if row and len(row) + len(item) + 2 > _WRAP:
                rows.append(row)
                row = ""
            row = f"{row} {item}," if row else f"    {item},"
        rows.append(row)
        return "[\n" + "\n".join(rows) + "\n]"
    raise TypeError(f"'{path}': {type(value).__name__} has no TOML form "
                    f"(use str, int, float, bool, date/time, list, tuple or dict)")
