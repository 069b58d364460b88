"""The control socket's one-line exchange: any request bytes get one JSON answer, never a crash."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusepass import control

COMMANDS: control.Commands = {"status": lambda: {"pid": 1}, "broken": lambda: {"x": 1 // 0}}


@given(st.binary(max_size=control.MAX_REQUEST))
def test_any_request_bytes_get_a_json_object(request: bytes) -> None:
    reply = control.answer(request, COMMANDS)
    assert isinstance(reply, dict)
    json.dumps(reply)


@pytest.mark.parametrize(("request_line", "words"), [
    (b"", "not a JSON object"), (b"[1, 2]", "not a JSON object"), (b"\xff\xfe", "not a JSON object"),
    (b'{"command": "restart"}', "unknown command 'restart'; known: broken, status"),
    (b'{"command": 7}', "unknown command 7"), (b'{"command": "broken"}', "broken failed: integer division or modulo by zero"),
])
def test_bad_requests_are_answered_with_an_error_in_words(request_line: bytes, words: str) -> None:
    reply = control.answer(request_line, COMMANDS)
    assert list(reply) == ["error"] and words in reply["error"], reply


def test_a_command_is_answered_with_its_document() -> None:
    assert control.answer(b'{"command": "status"}', COMMANDS) == {"pid": 1}


def test_the_server_answers_over_its_socket_and_survives_a_client_that_sends_garbage() -> None:
    connection = 2**31 - 7  # no real connection has this number
    server = control.ControlServer(COMMANDS, connection)
    try:
        for payload, expect in ((b"garbage\n", {"error": "the request is not a JSON object"}),
                                (b'{"command": "status"}\n', {"pid": 1})):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(server.path)
                s.sendall(payload)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            assert json.loads(data) == expect
    finally:
        server.close()
