"""JSON schema -> a regular expression for compact JSON valid under it (structured outputs).

The regex matches JSON with at most one space between tokens, properties in schema order. What a
regular language can say is supported; the rest is refused by name:

- types object, array, string, integer, number, boolean, null, and lists of types;
- object: `properties` (those outside `required` may be left out; JSON schema's default is
  that every property is optional), or a map (`additionalProperties` a schema, no `properties`),
  or free-form (neither: any keys and values);
- array: `items`, `prefixItems` (every prefix item present), `minItems`, `maxItems`; without
  `items`, any values;
- free-form JSON (an object or array as above, `true` / `{}` for any value) with containers
  nested up to `FREE_FORM_DEPTH` levels: unbounded nesting is not a regular language;
- string: `minLength`, `maxLength`, `pattern`, `format` (date-time, date, time, uuid, email,
  ipv4; other formats are annotations, as JSON schema treats them by default);
- integer: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (exact digit ranges);
- `enum`, `const`, `anyOf`, `oneOf` (as anyOf: exact when the alternatives are disjoint, as in
  pydantic's tagged unions), `allOf` of one schema;
- `$ref` to the document itself ("#/$defs/Name", "#/definitions/Name", any JSON pointer), as
  pydantic writes nested models and enums; a recursive reference is refused (JSON nested
  without bound is not regular).

Annotations (title, description, default, examples, ...) are ignored.
"""

from __future__ import annotations

import json
import math

WS = "[ ]?"  # between JSON tokens: nothing or one space
# A string's character: anything but a quote, a backslash or a control character, or an escape;
# \u escapes leave out UTF-16 surrogates (D800-DFFF): strict parsers refuse a lone one.
STRING_CHAR = r'([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u([0-9a-cA-CeEfF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))'
INTEGER = r"-?(0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(\.[0-9]+)?([eE][+-]?[0-9]+)?"
# Free-form JSON (an object without properties, an array without items, any value, vLLM's
# json_object) nests without bound in JSON schema; a regular language needs a bound. Containers
# nest up to this many levels, the outermost counted: {"a": {"b": 1}, "c": [1, "x"]} is depth 2.
# Each level multiplies the character DFA about 4x (507 states at 2, 2,075 at 3: 0.5 s vs 5 s to
# build with interegular).
FREE_FORM_DEPTH = 2

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "$defs", "definitions", "discriminator"}
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
SUPPORTED_KEYWORDS = _KEYWORDS | _ANNOTATIONS

_YEAR = r"([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"  # 0001-9999, as Python's date takes
_MULTIPLE_OF_4 = r"(0[48]|[2468][048]|[13579][26])"  # 04 .. 96
_LEAP_YEAR = rf"([0-9]{{2}}{_MULTIPLE_OF_4}|{_MULTIPLE_OF_4}00)"
_DATE = (rf"({_YEAR}-(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|{_YEAR}-(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         rf"|{_YEAR}-02-(0[1-9]|1[0-9]|2[0-8])|{_LEAP_YEAR}-02-29)")  # days per month, leap years
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+\-]([01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[a-zA-Z0-9_+\-]+(\.[a-zA-Z0-9_+\-]+)*@[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?"
             r"(\.[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?)+",
    "ipv4": rf"{_OCTET}(\.{_OCTET}){{3}}",
}


def free_value_regex(depth: int = FREE_FORM_DEPTH) -> str:
    """Any JSON value whose containers nest at most `depth` levels (0: a scalar)."""
    scalar = rf'("{STRING_CHAR}*"|{NUMBER}|true|false|null)'
    if depth <= 0:
        return scalar
    return f"({scalar}|{free_object_regex(depth)}|{free_array_regex(depth)})"


def free_object_regex(depth: int = FREE_FORM_DEPTH) -> str:
    """Any JSON object (string keys, values of `free_value_regex(depth - 1)`)."""
    return map_regex(free_value_regex(depth - 1))


def map_regex(value: str) -> str:
    """A JSON object with any string keys, every value matching `value`."""
    entry = f'"{STRING_CHAR}*":{WS}' + value
    return rf"\{{{WS}({entry}(,{WS}{entry})*)?{WS}\}}"


def free_array_regex(depth: int = FREE_FORM_DEPTH) -> str:
    """Any JSON array (items of `free_value_regex(depth - 1)`)."""
    item = free_value_regex(depth - 1)
    return rf"\[{WS}({item}(,{WS}{item})*)?{WS}\]"


def escape(text: str) -> str:
    """text as a regex literal (interegular's syntax: every non-alphanumeric character escaped)."""
    return "".join(c if c.isalnum() or c == " " else ("\\" + c if c.isprintable() else f"\\x{ord(c):02x}"
                                                     if ord(c) < 256 else c) for c in text)


def json_schema_regex(schema: dict, where: str = "StructuredOutputsParams.json") -> str:
    """A regex matching compact JSON (at most one space between tokens) valid under schema; a
    keyword or value it cannot express raises ValueError naming it (see the module docstring)."""
    return _Compiler(schema).regex(schema, where, ())


class _Compiler:
    def __init__(self, root):
        self.root = root

    def resolve(self, ref, where: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"{where}: $ref {ref!r} is not supported; only references into this schema "
                             "('#/$defs/Name') are")
        node = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ValueError(f"{where}: $ref {ref!r} points at nothing in the schema") from None
        return node

    def regex(self, schema, where: str, refs: tuple) -> str:
        if schema is True or schema == {}:  # any value, nested up to FREE_FORM_DEPTH
            return free_value_regex()
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: expected a schema object, got {schema!r}")
        unknown = sorted(set(schema) - SUPPORTED_KEYWORDS)
        if unknown:
            raise ValueError(f"{where}: unsupported JSON schema keyword(s) {unknown}; supported: "
                             f"{sorted(_KEYWORDS)} (annotations such as title are ignored)")
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in refs:
                raise ValueError(f"{where}: recursive $ref {ref!r} is not supported (JSON nested without bound "
                                 "is not a regular language)")
            target = self.resolve(ref, where)
            rest = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
            if rest:  # siblings of $ref constrain too (2020-12): as one schema where they do not clash
                target = _merge(target, rest, where)
            return self.regex(target, f"{where}.$ref({ref})", refs + (ref,))
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise ValueError(f"{where}: allOf is supported with one schema only, got {parts!r}")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.regex(_merge(parts[0], rest, where) if set(rest) - _ANNOTATIONS else parts[0],
                              f"{where}.allOf[0]", refs)
        if "const" in schema:
            return escape(json.dumps(schema["const"]))
        if "enum" in schema:
            return "(" + "|".join(escape(json.dumps(v)) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                rest = {k: v for k, v in schema.items() if k != key and k not in _ANNOTATIONS}
                return "(" + "|".join(self.regex(_merge(s, rest, where) if rest else s, f"{where}.{key}[{i}]", refs)
                                      for i, s in enumerate(schema[key])) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            return "(" + "|".join(self.regex({**schema, "type": k}, where, refs) for k in kind) + ")"
        if kind is None and "properties" in schema:
            kind = "object"
        if kind == "object":
            return self.object(schema, where, refs)
        if kind == "array":
            return self.array(schema, where, refs)
        if kind == "string":
            return string_regex(schema, where)
        if kind == "integer":
            return integer_regex(schema, where)
        if kind == "number":
            if set(schema) & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
                raise ValueError(f"{where}: bounds on a number are not supported (on an integer they are)")
            return NUMBER
        if kind == "boolean":
            return "(true|false)"
        if kind == "null":
            return "null"
        if kind is None:
            raise ValueError(f"{where}: the schema gives no type (nor enum, const, properties or a combinator)")
        raise ValueError(f"{where}: unsupported type {kind!r}; supported: object, array, string, integer, number, "
                         "boolean, null")

    def object(self, schema: dict, where: str, refs: tuple) -> str:
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        if not props:
            if isinstance(extra, dict) and extra:  # a map: string keys, values under one schema
                return map_regex(self.regex(extra, f"{where}.additionalProperties", refs))
            if extra is False:
                return rf"\{{{WS}\}}"
            return free_object_regex()  # free-form: any keys and values, nested up to FREE_FORM_DEPTH
        required = schema.get("required", [])
        missing = sorted(set(required) - set(props))
        if missing:
            raise ValueError(f"{where}: required {missing} are not in 'properties'")
        fields = [(escape(json.dumps(name)) + ":" + WS + self.regex(sub, f"{where}.{name}", refs), name in required)
                  for name, sub in props.items()]
        sep = "," + WS
        first = next((i for i, (_, req) in enumerate(fields) if req), None)
        if first is not None:  # optional fields before the first required one end in a comma, later ones start with one
            body = "".join(f"({f}{sep})?" for f, _ in fields[:first]) + fields[first][0]
            body += "".join(f"{sep}{f}" if req else f"({sep}{f})?" for f, req in fields[first + 1:])
        else:  # all optional: the first present field, then any of the later ones
            body = "(" + "|".join(f + "".join(f"({sep}{g})?" for g, _ in fields[i + 1:])
                                  for i, (f, _) in enumerate(fields)) + ")?"
        return rf"\{{{WS}{body}{WS}\}}"

    def array(self, schema: dict, where: str, refs: tuple) -> str:
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        hi = None if hi is None else int(hi)
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: maxItems={hi} < minItems={lo}")
        sep = "," + WS
        prefix = [self.regex(s, f"{where}.prefixItems[{i}]", refs) for i, s in enumerate(schema.get("prefixItems", []))]
        items = schema.get("items", not prefix)  # absent: any values (True), or none after prefixItems
        if prefix:
            if hi is not None and hi < len(prefix):
                raise ValueError(f"{where}: maxItems={hi} leaves out prefixItems (every prefix item is generated)")
            body = sep.join(prefix)
            if items is not False:
                item = self.items(items, where, refs)
                more = "" if hi is None else str(hi - len(prefix))
                body += f"({sep}{item}){{0,{more}}}" if more != "0" else ""
            return rf"\[{WS}{body}{WS}\]"
        if hi == 0 or items is False:
            if lo > 0:
                raise ValueError(f"{where}: minItems={lo} but no items are allowed")
            return r"\[\]"
        item = self.items(items, where, refs)
        more = f"{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        body = f"{item}({sep}{item}){more}"
        return rf"\[{WS}" + (f"({body})?" if lo == 0 else body) + rf"{WS}\]"

    def items(self, items, where: str, refs: tuple) -> str:
        if items is True or items == {}:  # any values: the array is the free-form part's first level
            return free_value_regex(FREE_FORM_DEPTH - 1)
        return self.regex(items, f"{where}.items", refs)


def _merge(base, extra: dict, where: str) -> dict:
    """base and extra's keywords as one schema (their conjunction where they do not clash)."""
    if not isinstance(base, dict):
        raise ValueError(f"{where}: expected a schema object, got {base!r}")
    clash = sorted(k for k in set(base) & set(extra) - _ANNOTATIONS if base[k] != extra[k])
    if clash:
        raise ValueError(f"{where}: keywords {clash} given twice with different values (allOf / $ref siblings); "
                         "not supported")
    return {**base, **extra}


def string_regex(schema: dict, where: str) -> str:
    if "pattern" in schema:
        return '"' + schema["pattern"].removeprefix("^").removesuffix("$") + '"'
    fmt = schema.get("format")
    if fmt in FORMATS:
        return '"' + FORMATS[fmt] + '"'
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    if hi is not None and int(hi) < lo:
        raise ValueError(f"{where}: maxLength={hi} < minLength={lo}")
    return f'"{STRING_CHAR}{{{lo},{"" if hi is None else int(hi)}}}"'


def integer_regex(schema: dict, where: str) -> str:
    """Integers within the schema's bounds, as exact digit patterns."""
    lo = hi = None
    for key, strict, is_lo in (("minimum", False, True), ("exclusiveMinimum", True, True),
                               ("maximum", False, False), ("exclusiveMaximum", True, False)):
        if key not in schema:
            continue
        v = schema[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: {key}={v!r} must be a number")
        if is_lo:
            bound = math.floor(v) + 1 if strict else math.ceil(v)
        else:
            bound = math.ceil(v) - 1 if strict else math.floor(v)
        if is_lo:
            lo = bound if lo is None else max(lo, bound)
        else:
            hi = bound if hi is None else min(hi, bound)
    if lo is None and hi is None:
        return INTEGER
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{where}: no integer lies within the bounds (minimum {lo} > maximum {hi})")
    alts = []
    if lo is None or lo < 0:  # negative part: -m for m in [max(1, -hi), -lo]
        alts += ["-" + p for p in _naturals(max(1, -hi) if hi is not None else 1, None if lo is None else -lo)]
    if hi is None or hi >= 0:
        alts += _naturals(max(0, lo) if lo is not None else 0, hi)
    return "(" + "|".join(alts) + ")"


def _naturals(a: int, b: int | None) -> list[str]:
    """Patterns for the decimal numerals (no leading zeros) of a..b (b None: unbounded)."""
    out = []
    top = len(str(b)) if b is not None else len(str(a))
    for n in range(len(str(a)), top + 1):
        lo = str(a) if n == len(str(a)) else "1" + "0" * (n - 1)
        hi = str(b) if b is not None and n == len(str(b)) else "9" * n
        out += _same_length(lo, hi)
    if b is None:  # every numeral longer than a's
        out.append(f"[1-9][0-9]{{{len(str(a))},}}")
    return out


def _same_length(a: str, b: str) -> list[str]:
    """Patterns for the numerals from a to b, both n digits long."""
    if a == b:
        return [a]
    if a[0] == b[0]:
        return [a[0] + p for p in _same_length(a[1:], b[1:])]
    rest = len(a) - 1
    out = [a[0] + p for p in _same_length(a[1:], "9" * rest)] if a[1:] != "0" * rest else []
    first = int(a[0]) + (a[1:] != "0" * rest)
    last = int(b[0]) - (b[1:] != "9" * rest)
    if first <= last:
        digit = str(first) if first == last else f"[{first}-{last}]"
        out.append(digit + "[0-9]" * rest)
    if b[1:] != "9" * rest:
        out += [b[0] + p for p in _same_length("0" * rest, b[1:])]
    return out
