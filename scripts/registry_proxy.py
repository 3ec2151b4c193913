"""An HTTP proxy that lets a sealed-off machine reach the package registries and nothing else.

The bare-machine check (scripts/bare-machine-check.sh) runs a fresh Debian root in a network
namespace of its own; apt-get and pip inside it reach Debian's and Python's registries through
this proxy, on the host end of a veth pair. It forwards plain-HTTP requests (apt) and tunnels
CONNECT (pip's HTTPS) to the allowed hosts only, one request per connection.

    python scripts/registry_proxy.py --listen 10.201.16.1:3128 [--allow host ...]
"""

import argparse
import asyncio
import sys
from urllib.parse import urlsplit

REGISTRIES = ("deb.debian.org", "security.debian.org", "pypi.org", "files.pythonhosted.org")
HEADER_LIMIT = 64 * 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the reading side closes, then close the writing side."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def refuse(writer: asyncio.StreamWriter, status: str, reason: str) -> None:
    body = f"{reason}\n".encode()
    writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()


async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, allowed: set[str]) -> None:
    try:
        head = await client_reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        client_writer.close()
        return
    request_line, _, header_block = head.decode("latin-1").partition("\r\n")
    method, target, version = (request_line.split(" ") + ["", ""])[:3]
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        port_number = int(port) if port.isdigit() else 443
    else:
        url = urlsplit(target)
        host, port_number = url.hostname or "", url.port or 80
    if host not in allowed:
        print(f"refused {method} {target}", file=sys.stderr, flush=True)
        await refuse(client_writer, "403 Forbidden", f"{host or target} is not a package registry")
        return
    try:
        upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(host, port_number), 30)
    except (OSError, asyncio.TimeoutError) as error:
        await refuse(client_writer, "502 Bad Gateway", f"{host}:{port_number}: {error}")
        return
    print(f"{method} {target}", file=sys.stderr, flush=True)
    if method == "CONNECT":
        client_writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await client_writer.drain()
    else:
        # Origin form to the server, and one request per connection: a kept-alive client
        # connection could name another host next.
        headers = [
            line
            for line in header_block.split("\r\n")
            if line and line.split(":", 1)[0].strip().lower() not in ("connection", "proxy-connection", "keep-alive")
        ]
        path = url.path or "/"
        if url.query:
            path += f"?{url.query}"
        request = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close", "", ""])
        upstream_writer.write(request.encode("latin-1"))
        await upstream_writer.drain()
        await pipe(upstream_reader, client_writer)
        upstream_writer.close()
        return
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


async def serve(*, address: str, port: int, allowed: set[str]) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, allowed), address, port, limit=HEADER_LIMIT)
    print(f"registry proxy on {address}:{port} for {', '.join(sorted(allowed))}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="address:port to listen on")
    parser.add_argument("--allow", nargs="*", default=[], help="hosts allowed besides the registries")
    options = parser.parse_args()
    address, _, port = options.listen.rpartition(":")
    if not address or not port.isdigit():
        parser.error(f"--listen: expected address:port, got {options.listen!r}")
    asyncio.run(serve(address=address, port=int(port), allowed=set(REGISTRIES) | set(options.allow)))


if __name__ == "__main__":
    main()
