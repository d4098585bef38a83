# Types of the compiled row maker (engine/ingest/_rows.c).
from typing import Any, TypeVar

T = TypeVar("T", bound=tuple[Any, ...])

def take_rows(cls: type[T], /, *columns: list[Any]) -> list[T]: ...
