"""Building a Config: dataclass defaults < preset or YAML file < `--set a.b=value` overrides.

Every value is coerced to its field's declared type (`coerce`): a `--set` value for a string
key is kept verbatim, anything else is read as YAML; bools are refused for numbers and
fractions for integers.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from furnace.config.tree import Config, ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


def field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


class _SetText(str):
    """The text after '=' in `--set key=text`. A string key keeps it verbatim (YAML would turn
    0123 into 83 and off into False); any other key reads it as YAML."""


_NONE_WORDS = ("none", "null", "")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}


def split_optional(tp) -> tuple[typing.Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def as_int(v) -> int | None:
    """An integral value as an int (3, 3.0, "3", "1e3"); None for a bool, a fraction or junk."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            try:
                v = float(v.strip())
            except ValueError:
                return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def as_float(v) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v.strip() if isinstance(v, str) else v) if isinstance(v, (int, float, str)) else None
    except (ValueError, OverflowError):
        return None


def _coerce(value, tp, key: str):
    """Turn a YAML/JSON value or `--set` text (`_SetText`) into the field's declared type."""
    tp, optional = split_optional(tp)
    text = value if isinstance(value, _SetText) else None
    where = f"--set {key}" if text is not None else key
    shown = str(text) if text is not None else repr(value)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if text is not None:
        if tp is str:
            return str(text)
        if tp in (int, float):  # plain numbers first: YAML would read 0123 as octal 83
            out = (as_int if tp is int else as_float)(text)
            if out is not None:
                return out
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: cannot read {shown!r} as YAML ({getattr(e, 'problem', None) or e})"
                              .replace("\n", " ")) from None

    def refuse(expected: str, hint: str = ""):
        raise ConfigError(f"{where}: expected {expected}{' or none' if optional else ''}, got {shown}{hint}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        refuse("true/false")
    if tp is int:
        out = as_int(value)
        if out is None:
            refuse("an integer")
        return out
    if tp is float:
        out = as_float(value)
        if out is None:
            refuse("a number")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        refuse("a string", "; quote it in YAML" if isinstance(value, bool) else "")
    if tp is dict:
        if not isinstance(value, dict):
            refuse("a mapping")
        return value
    if typing.get_origin(tp) is list:  # list[str]: a YAML list, or `--set key=a,b`
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            refuse("a list of names", "; e.g. --set " + key + "=q,v")
        return list(value)
    return value


# Keys furnace no longer has: a saved config.json (resume, export) may still hold them.
RETIRED = {"parallel.pipeline_activation_checkpoint_interval":
           "model.activation_checkpointing now checkpoints the blocks in every layout"}


def update(obj, data: dict, prefix: str = "", *, saved: bool = False) -> None:
    """Set the fields of config section `obj` from a nested dict (YAML, a saved config.json,
    `_parse_set`), coercing each value to its declared type. `prefix` names the section in errors.
    `saved`: the dict was written by an earlier run, whose retired keys are passed over."""
    types_ = field_types(type(obj))
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in RETIRED:
            if saved:
                continue
            raise ConfigError(f"{key} was removed: {RETIRED[key]}")
        if k not in types_:
            known = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key {key!r}; known keys under {prefix or 'the root'}: {known}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if isinstance(v, _SetText):  # --set model.xattn={every: 2, heads: 4}
                try:
                    v = yaml.safe_load(v)
                except yaml.YAMLError:
                    pass
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {v!r}")
            update(cur, v, key + ".", saved=saved)
        else:
            setattr(obj, k, _coerce(v, types_[k], key))


def _parse_set(item: str) -> dict:
    """`a.b=text` -> {"a": {"b": _SetText(text)}}; `update` coerces the text per the key's type."""
    if "=" not in item:
        raise ConfigError(f"--set takes key=value (e.g. train.max_steps=100); got {item!r}")
    key, raw = item.split("=", 1)
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = _SetText(raw)
    return out


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file or a preset name")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        names = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of: {names}, or pass a YAML file")
    return preset


def load_config(preset: str | None = "demo", overrides: typing.Sequence[str] = ()) -> Config:
    cfg = Config()
    if preset:
        path = resolve_preset(preset)
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or 'parse error'}{where}); "
                              "fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
        try:
            update(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for item in overrides:
        update(cfg, _parse_set(item))
    return cfg
