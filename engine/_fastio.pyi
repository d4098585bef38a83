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
