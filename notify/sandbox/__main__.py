"""Run the provider sandbox: python -m notify.sandbox --port 8025 [--faults JSON]"""

import argparse
import json

import uvicorn

from notify.sandbox.sent import STORE_SIZE
from notify.sandbox.server import LOG_SIZE, Sandbox, callback_network_parse


def main() -> None:
    parser = argparse.ArgumentParser(description="Loopback fakes of the notification providers.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument(
        "--faults", default="{}", help='initial faults per provider, e.g. \'{"postmark": {"latency_ms": 20}}\''
    )
    parser.add_argument(
        "--webhook",
        action="append",
        default=[],
        metavar="PROVIDER=URL",
        help="send the provider's delivery webhooks to URL (basic auth may be in the URL)",
    )
    parser.add_argument(
        "--log-size", type=int, default=LOG_SIZE, help=f"requests the log keeps, newest first (default {LOG_SIZE})"
    )
    parser.add_argument(
        "--store-size",
        type=int,
        default=STORE_SIZE,
        help=f"accepted messages each provider keeps for search and duplicate counting (default {STORE_SIZE})",
    )
    parser.add_argument(
        "--callback-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="a private network, besides loopback, that status callbacks and webhooks may go to "
        "(e.g. 10.231.7.0/24 for services on network namespaces of this machine)",
    )
    args = parser.parse_args()
    for network in args.callback_network:
        try:
            callback_network_parse(network)
        except ValueError as error:
            parser.error(f"--callback-network {network}: {error} (give a private network such as 10.0.0.0/24)")
    webhooks = dict(item.split("=", 1) for item in args.webhook)
    sandbox = Sandbox(
        faults=json.loads(args.faults),
        webhooks=webhooks,
        log_size=args.log_size,
        store_size=args.store_size,
        callback_networks=tuple(args.callback_network),
    )
    if not all(sandbox.callback_allowed(url) for url in webhooks.values()):
        parser.error("webhook URLs must be on loopback (127.0.0.0/8, localhost or ::1) or a --callback-network")
    uvicorn.run(
        sandbox,
        host=args.host,
        port=args.port,
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
