"""Config machinery every job shares: the one-line check, dict <-> dataclass, YAML, `parse_config`.

Every field carries a comment that simple-parsing turns into `--help` text. Flags are the dotted
field paths (`--optim.lr 0.01`), the same keys a `--config_path run.yaml` file uses.
Precedence: dataclass defaults < YAML file < command line. Unknown keys are errors.
This package knows nothing of torch or SLURM so it imports in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bonnerlab.errors import ConfigError
from bonnerlab.runs import NEWEST, atomic_write_text


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition: the one-line check every config uses."""
    if not condition:
        raise ConfigError(message)


def check_checkpoint(checkpoint: str) -> None:
    """One name per concept: `latest` is a run's latest.pt (`which`), the newest run `newest`."""
    check(
        checkpoint != "latest" or Path("latest").exists(),
        f"checkpoint latest: the newest run is --checkpoint {NEWEST} (a run's latest.pt is "
        "--checkpoint RUN --which latest)",
    )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ----------------------------------------------------------------------------- dict <-> dataclass

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) that YAML and JSON can hold."""
    return dataclasses.asdict(cfg)


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}: a config as its flags' names."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; convert only where no information is lost."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {annotation}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}"
            )
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build `cls` from a nested dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    renamed = getattr(cls, "renamed_keys", {})
    data = {renamed.get(k, k) if renamed.get(k) not in data else k: v for k, v in data.items()}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config key {dotted}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {dotted}")
    node[parts[-1]] = value


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """A new config with dotted keys replaced (`{"optim.lr": 0.01}`), validated like a YAML file."""
    tree = to_dict(cfg)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return from_dict(type(cfg), tree)


# ----------------------------------------------------------------------------- YAML

# YAML 1.2's floats that PyYAML's YAML 1.1 resolver reads as strings: an exponent without a dot
# or without a sign (1e-3, 1.0e3, 5E4). The dotted forms with a signed exponent are 1.1 floats
# already; integers stay integers (no dot, no exponent).
_FLOAT_12 = r"[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives the same key twice (PyYAML keeps the last one, silently)."""

    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"key {key!r} given twice (lines {first} and {second})")


class ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml.safe_load as a config means it: `lr: 1e-3` is a float, a duplicate key an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error says so below
                pass
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(f"^{_FLOAT_12}$"), list("-+.0123456789")
)


def parse_yaml(text: str) -> Any:
    """YAML text as configs read it (ConfigLoader); raises yaml.YAMLError."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: builds no Python objects


def yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its message spans several)."""
    if isinstance(e, DuplicateKeyError):
        return str(e)
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(e).splitlines()[0]


def save_yaml(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = parse_yaml(path.read_text()) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_error(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, load_yaml(path))


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` into `cls`: defaults < `--config_path` YAML < dotted command-line flags."""
    import simple_parsing

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_path", default=None)
    known, _ = pre.parse_known_args(argv)
    default = load_config(cls, known.config_path) if known.config_path else cls()

    parser = simple_parsing.ArgumentParser(
        prog=prog,
        description=cls.__doc__,
        nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
        argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
        add_config_path_arg=False,
    )
    parser.add_argument(
        "--config_path",
        default=None,
        metavar="PATH",  # argparse would show the default: `--config_path None`
        help="YAML file of config values (command-line flags win)",
    )
    parser.add_arguments(cls, dest="cfg", default=default)
    try:
        namespace = parser.parse_args(argv)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    return namespace.cfg
