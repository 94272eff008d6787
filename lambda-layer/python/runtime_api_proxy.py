"""A pass-through HTTP proxy in front of a Lambda runtime API emulator that
adds the `Content-Type` header AWS's runtime API sends with every next
invocation.

Why: awslambdaric 4.2.2 (the Python runtime interface client) dereferences
a null pointer and dies with SIGSEGV when the answer to
`GET .../runtime/invocation/next` has no `Content-Type` (seen with strace:
the crash follows the `recvfrom` of that answer). cargo-lambda's emulator
1.9.2 sends none; AWS's runtime API always does. The proxy lets the CI test
run the Python function against the emulator as it would run on Lambda.

Usage: runtime_api_proxy.py LISTEN_PORT UPSTREAM_PORT
Prints "ready" once listening. Only the status line and headers of each
answer are looked at; bodies pass through untouched.
"""
import socket
import sys
import threading

HEADER_LIMIT = 64 << 10


def relay(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def answers(upstream, client):
    """Copies answers from the emulator to the client, adding a
    Content-Type to each header block that has none."""
    buf = b""
    try:
        while True:
            data = upstream.recv(65536)
            if not data:
                break
            buf += data
            while buf:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > HEADER_LIMIT:
                        raise OSError("header block too large")
                    break
                head, rest = buf[: end + 2], buf[end + 4 :]
                lines = head.split(b"\r\n")
                names = [line.split(b":", 1)[0].strip().lower() for line in lines[1:] if b":" in line]
                if b"content-type" not in names:
                    head += b"Content-Type: application/json\r\n"
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                client.sendall(head + b"\r\n")
                # The body, which may not have arrived yet.
                while len(rest) < length:
                    more = upstream.recv(65536)
                    if not more:
                        break
                    rest += more
                client.sendall(rest[:length])
                buf = rest[length:]
    except (OSError, ValueError):
        pass
    finally:
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main():
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(16)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        threading.Thread(target=relay, args=(client, upstream), daemon=True).start()
        threading.Thread(target=answers, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main()
