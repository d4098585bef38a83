# Types of the compiled row maker (engine/_rows.c).
from typing import Any, TypeVar

T = TypeVar("T", bound=tuple[Any, ...])

def zip_as(cls: type[T], /, *columns: list[Any]) -> list[T]: ...
