"""The try-a-model page's relay (imgclf.ui.server) against an upstream that behaves like multi-model-server on a
body over its limit: it answers 413 after the headers and closes without reading the rest. The relay must pass
that answer on, not a 502 for the broken pipe (CI saw the 502 when the race went this way)."""

from __future__ import annotations

import socket
import threading

import requests
from imgclf.ui import server

ANSWER = b'{"code": 413, "type": "RequestEntityTooLarge"}'


def early_answering_upstream(listener: socket.socket) -> None:
    while True:
        connection, _ = listener.accept()
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(1 << 16)
            connection.sendall(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(ANSWER), ANSWER))
        # closed with the body unread: the kernel resets the connection while the relay still sends


def test_an_answer_sent_before_the_whole_body_is_relayed():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=early_answering_upstream, args=(listener,), daemon=True).start()
        ui = server.start(0, listener.getsockname()[1])
        try:
            for _ in range(3):
                reply = requests.post(ui.url + "invocations", data=b"\xff" * (3 << 20), timeout=30,
                                      headers={"Content-Type": "image/jpeg"})
                assert (reply.status_code, reply.content) == (413, ANSWER)
                assert reply.headers["Content-Type"] == "application/json"
        finally:
            ui.shutdown()
            ui.server_close()
