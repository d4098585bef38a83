from typing import Any

def durable_write(
    fd: int, data: bytes, sync: bool, sock_fd: int, answers: list[tuple[bytes, bytes]]
) -> tuple[int, int]: ...
def receive(
    fd: int,
    headers_address: int,
    slots: int,
    name_bytes: int,
    separator: int,
    max_call_id: int,
    max_serial: int,
) -> tuple[list[tuple[bytes, bytes, tuple[str, int] | None, bytes | None]], int]: ...
def read_usual_key(
    data: bytes, separator: int, max_call_id: int, max_serial: int
) -> tuple[tuple[str, int], bytes] | None: ...
def take_usual(
    received: list[tuple[bytes, Any, tuple[str, int] | None, bytes | None]],
    start: int,
    peers: dict[Any, str | None],
    seen: set[tuple[str, int]],
    waiting: dict[tuple[str, int], list[Any]],
    max_pending: int,
    now: float,
    endpoint: Any,
    records: list[Any],
    keys: list[tuple[str, int]],
    answers: list[tuple[bytes, tuple[Any, Any]]],
) -> int: ...
def release_waiting(
    keys: list[tuple[str, int]], waiting: dict[tuple[str, int], list[Any]]
) -> list[tuple[bytes, Any]]: ...
