"""Command-line flags built from a pydantic model's fields: one flag per field, with the field's
description, default and bounds in ``--help`` and the model's own validation of the values.

Unset flags are left out, so the model's declared defaults apply. List fields take one or more
arguments, each of which may be comma-separated (the API's syntax).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _bounds(metadata: Sequence[Any]) -> list[str]:
    found = []
    for kind, attr, symbol in BOUNDS:
        for m in metadata:
            if isinstance(m, kind):
                found.append(f"{symbol}{getattr(m, attr)}")
    return found


def _item_metadata(annotation: Any) -> list[Any]:
    """Constraints of a list field's items (``tuple[Annotated[float, Field(ge=0)], ...]``)."""
    item = typing.get_args(_unwrap(annotation))[0]
    if typing.get_origin(item) is typing.Annotated:
        return [m for a in typing.get_args(item)[1:] for m in getattr(a, "metadata", [a])]
    return []


def is_list(field: FieldInfo) -> bool:
    return typing.get_origin(_unwrap(field.annotation)) in (tuple, list)


def format_default(value: Any) -> str:
    """A default as ``--help`` shows it; a list's items apart, so that a long one wraps between them."""
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def describe(field: FieldInfo) -> str:
    """The field's description, then ``(default: D; bounds)`` in a fixed, parseable form."""
    facts = [f"default: {format_default(field.default)}"]
    if is_list(field):
        low = next((m.min_length for m in field.metadata if isinstance(m, annotated_types.MinLen)), None)
        high = next((m.max_length for m in field.metadata if isinstance(m, annotated_types.MaxLen)), None)
        count = f"{low}-{high} values" if low is not None and high is not None else "one or more values"
        facts.append(" ".join([count, *_bounds(_item_metadata(field.annotation))]))
    else:
        facts.extend(_bounds(field.metadata))
    return f"{field.description or ''} ({'; '.join(facts)})".strip()


def add_model_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], aliases: Mapping[str, Sequence[str]] = {}
) -> None:
    for name, field in model.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": describe(field)}
        target = _unwrap(field.annotation)
        if is_list(field):
            kwargs["nargs"] = "+"
        elif typing.get_origin(target) is Literal:
            kwargs["choices"] = typing.get_args(target)
        elif target is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        parser.add_argument("--" + name.replace("_", "-"), *aliases.get(name, ()), **kwargs)


def positive(kind: Callable[[str], int | float]) -> Callable[[str], int | float]:
    """An argparse ``type``: a number above zero (argparse names the flag when it is not)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def port(text: str) -> int:
    """An argparse ``type``: a TCP port to listen on."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {text}")
    return value


def model_from_args(model: type[BaseModel], args: argparse.Namespace, **extra: Any) -> BaseModel:
    """The model from the flags given (the rest default); raises ``ValueError`` naming the field."""
    values = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        return model(**values, **extra)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise ValueError(f"{flag}: {first['msg'].removeprefix('Value error, ')}") from exc
