"""The contract's enum values as the short, lower-case names people type, and back: "int8" for
PRECISION_INT8, "mean" for POOLING_MEAN. One rule for the client, the command, the KServe mapping,
the metrics and the exporter: the value's name without its enum's prefix (buf's lint makes every
value start with its enum's name in upper snake case)."""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import EnumDescriptor


def _descriptor(enum: Any) -> EnumDescriptor:
    """An enum's descriptor, from the descriptor itself or the generated enum wrapper."""
    return getattr(enum, "DESCRIPTOR", enum)


def enum_prefix(enum: Any) -> str:
    """FinishReason -> FINISH_REASON_, the prefix of its value names."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", _descriptor(enum).name).upper() + "_"


def short_names(enum: Any) -> dict[str, int]:
    """Every value but the unspecified default (0), by short name."""
    prefix = enum_prefix(enum)
    return {v.name.removeprefix(prefix).lower(): v.number for v in _descriptor(enum).values if v.number}


def short_name(enum: Any, value: int) -> str:
    """PRECISION_INT8 -> "int8"; a number the contract does not name comes back as its digits."""
    named = _descriptor(enum).values_by_number.get(value)
    return str(value) if named is None else named.name.removeprefix(enum_prefix(enum)).lower()


def enum_value(enum: Any, name: str) -> int:
    """"int8" (or "INT8") -> PRECISION_INT8; an unknown name is a ValueError that lists the known ones."""
    names = short_names(enum)
    if name.lower() not in names:
        raise ValueError(f"unknown value {name!r}; choose one of {list(names)}")
    return names[name.lower()]
