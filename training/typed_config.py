"""The one config mechanism of the long jobs (`TrainConfig`, `RecaptionConfig`): typed dataclass fields that carry their
help text and their checks, filled from YAML, JSON, `--set key=value` or widget values.

Rules, the same for every config:
- an unknown or misspelled key is an error naming it and the closest known key ("did you mean");
- values are converted to the field's type where the text is unambiguous, else refused with the key, the value and
  the type wanted: "4" -> 4 for an int, "2e-4" -> 0.0002 for a float, 4.0 -> 4 for an int (4.5 is refused);
  a bool takes true/false or the words yes/no, on/off, 1/0 (any case) and nothing else, so "no" is False, never True;
- `choices`, `minimum` and `maximum` in a field's metadata are checked in one place, with the allowed range in the
  message;
- the help text is written once, on the field, and every help screen is generated from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import field
from typing import Any

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
_INT_TEXT = re.compile(r"[-+]?\d+")
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def setting(
    default: Any,
    help: str,  # noqa: A002 (argparse's and peft's name for it)
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    **extra: Any,
):
    """A dataclass field with its help text and checks; list and dict defaults are copied per instance."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, **extra}
    metadata["exclusive_minimum"] = exclusive_minimum
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_default(item: dataclasses.Field) -> Any:
    """The default of a dataclass field, calling its factory when it has one."""
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory()


def _type_name(option: Any) -> str:
    if option is type(None):
        return "null"
    origin = typing.get_origin(option)
    if origin is list:
        (item,) = typing.get_args(option) or (Any,)
        return f"a list of {_type_name(item)}" if item is not Any else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list"}.get(
        option, getattr(option, "__name__", str(option))
    )


class _Refused(Exception):
    """One type option does not take the value (the caller tries the next one)."""


def _convert(value: Any, option: Any) -> Any:
    origin = typing.get_origin(option)
    if option is Any:
        return value
    if option is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
    elif option is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            return int(value)
    elif option is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as text; it is plainly a number
    elif option is str:
        if isinstance(value, str):
            return value
    elif option is list or origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(option) or (Any,)
            return [_convert(element, item) for element in value]
    elif (option is dict or origin is dict) and isinstance(value, Mapping):
        return dict(value)
    raise _Refused


def coerce_value(value: Any, annotation: Any, key: str) -> Any:
    """`value` as the type `annotation` names (str, int, float, bool, list[...], unions, X | None); a ValueError
    naming `key`, the value and the wanted type when the conversion would be a guess."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(value, option)
        except _Refused:
            continue
    wanted = " or ".join(_type_name(option) for option in options)
    extra = " (a bool takes true/false, yes/no, on/off or 1/0)" if bool in options else ""
    raise ValueError(f"Config key {key!r} must be {wanted}, got {value!r} ({type(value).__name__}){extra}.")


def _hints(target: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(target))


def apply_values(target: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    """Set `values` (nested mappings for nested sections) on the dataclass `target`, converting each to its field's
    type; an unknown key is a ValueError with the closest known one."""
    if not isinstance(values, Mapping):
        raise ValueError(f"Config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {values!r}.")
    hints = _hints(target)
    names = [item.name for item in dataclasses.fields(target)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys here: {', '.join(names)}."
            raise ValueError(f"Unknown config key {full!r}.{hint}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"Config key {full!r} is a section; give a mapping of its keys, got {value!r}.")
            apply_values(current, value, prefix=f"{full}.")
        else:
            setattr(target, key, coerce_value(value, hints[key], full))


def coerce_fields(target: Any, prefix: str = "") -> None:
    """Convert every field already set on `target` (e.g. by keyword arguments) to its type, in place."""
    hints = _hints(target)
    for item in dataclasses.fields(target):
        value = getattr(target, item.name)
        if dataclasses.is_dataclass(value):
            coerce_fields(value, f"{prefix}{item.name}.")
        else:
            setattr(target, item.name, coerce_value(value, hints[item.name], f"{prefix}{item.name}"))


def _check_range(key: str, value: Any, metadata: Mapping[str, Any]) -> None:
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if value is None or isinstance(value, (str, list, bool)) or (low is None and high is None):
        return
    exclusive = metadata.get("exclusive_minimum", False)
    too_low = low is not None and (value <= low if exclusive else value < low)
    if too_low or (high is not None and value > high):
        bound = " and ".join(
            text
            for text in (
                None if low is None else f"{'>' if exclusive else '>='} {low:g}",
                None if high is None else f"<= {high:g}",
            )
            if text
        )
        raise ValueError(f"{key} must be {bound}, got {value!r}.")


def check_fields(target: Any, prefix: str = "") -> None:
    """Check every field's `choices`, `minimum` and `maximum` (nested sections too); ValueError on the first bad one."""
    for item in dataclasses.fields(target):
        value = getattr(target, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
            continue
        choices = item.metadata.get("choices")
        values = value if isinstance(value, list) else [value]
        if choices and any(v not in choices for v in values):
            bad = next(v for v in values if v not in choices)
            raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}; got {bad!r}.")
        _check_range(key, value, item.metadata)


def walk_fields(target: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) for every leaf field of a config, sections in order."""
    for item in dataclasses.fields(target):
        value = getattr(target, item.name)
        if dataclasses.is_dataclass(value):
            yield from walk_fields(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", item, value


def config_help(target: Any) -> str:
    """Every key with its default, allowed values and help text (what `--help-config` prints)."""
    lines = []
    for key, item, value in walk_fields(target):
        choices = item.metadata.get("choices")
        allowed = f"  (one of: {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  {key} = {value!r}{allowed}\n      {item.metadata.get('help', '')}")
    return "\n".join(lines)


def nest(dotted: Mapping[str, Any]) -> dict:
    """{'loop.max_steps': 5} -> {'loop': {'max_steps': 5}}."""
    nested: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Config key {key!r} sets a key inside {part!r}, which is not a section.")
        node[parts[-1]] = value
    return nested
