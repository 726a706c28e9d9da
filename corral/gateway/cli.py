"""``corral serve``: the gateway, as one Ray actor per node (default) or standalone.

    corral serve --token-file tokens.txt [--host 0.0.0.0] [--port 8765]        # a gateway on every node
    corral serve --standalone --host 127.0.0.1 --port 8765 --token-file tokens.txt
    corral serve --stop                                                         # remove the node gateways

Tokens come from ``--token-file`` (``<tenant> <token>`` lines) or the same
text in ``$CORRAL_GATEWAY_TOKENS``, never from the command line (other users
of the machine can read command lines). Without tokens it refuses to start.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--standalone", action="store_true",
                   help="serve under plain uvicorn in the foreground instead of one Ray actor per node")
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1 standalone, 0.0.0.0 per node)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; standalone: 0 picks one)")
    p.add_argument("--token-file", help="file with one '<tenant> <token>' a line (or set $CORRAL_GATEWAY_TOKENS)")
    p.add_argument("--certfile", help="TLS certificate (PEM); per node: a path that exists on every node")
    p.add_argument("--keyfile", help="TLS private key (PEM)")
    p.add_argument("--settings", help="JSON file of gateway limits (GatewaySettings: body sizes, timeouts)")
    p.add_argument("--pool-size", type=int, help="warm sandboxes per type (the config's pool_size)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or the cluster running here)")
    p.add_argument("--ready-file", help="standalone: write {url, port, pid} as JSON here once listening")
    p.add_argument("--stop", action="store_true", help="remove the namespace's per-node gateways and exit")
    # The global config flags, also accepted after the subcommand.
    p.add_argument("--namespace", default=argparse.SUPPRESS, help="Ray namespace of corral's actors")
    p.add_argument("--config", default=argparse.SUPPRESS, help="JSON file with a SandboxManagerEnvConfig")
    p.add_argument("--driver", choices=["process", "docker"], default=argparse.SUPPRESS,
                   help="container_deployment")


def _config(args: argparse.Namespace):
    from corral.cli import _config as command_config
    from corral.models import SandboxManagerEnvConfig

    config = command_config(args)  # --config, --namespace, --driver, as every corral command reads them
    if args.pool_size is not None:
        config = SandboxManagerEnvConfig.model_validate({**config.model_dump(), "pool_size": args.pool_size})
    return config


def _settings(args: argparse.Namespace):
    from corral.errors import InvalidRequest

    from .settings import GatewaySettings

    if not args.settings:
        return GatewaySettings()
    try:
        with open(args.settings) as f:
            return GatewaySettings.model_validate(json.load(f))
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"--settings {args.settings}: {e}") from None


def _join_cluster(address: str | None, namespace: str) -> None:
    """Join a running Ray cluster: node gateways outlive this command, a cluster started here would not."""
    import ray

    from corral.errors import InvalidRequest

    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", namespace=namespace, log_to_driver=False)
    except ConnectionError as e:
        raise InvalidRequest(
            f"no Ray cluster to join ({e}): start one with `ray start --head`, or run `corral serve --standalone`"
        ) from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from corral.manager import SandboxManager

    from .auth import Tenants
    from .server import run_standalone, start_gateways, stop_gateways

    config = _config(args)
    if args.stop:
        _join_cluster(args.address, config.namespace)
        names = stop_gateways(config.namespace)
        print(f"removed {len(names)} gateway(s) of namespace {config.namespace}")
        return 0
    tenants = Tenants.load(args.token_file)
    if tenants.world_readable:
        print(f"corral: warning: {args.token_file} can be read by other users (chmod 600 it)", file=sys.stderr)
    settings = _settings(args)
    if args.standalone:
        manager = SandboxManager(config, address=args.address)
        run_standalone(manager, tenants, args.host or "127.0.0.1", args.port, settings,
                       args.certfile, args.keyfile, args.ready_file)
        return 0
    _join_cluster(args.address, config.namespace)
    manager = SandboxManager(config)  # starts corral's actors in the namespace if none run
    rows = start_gateways(manager.config, tenants, args.host or "0.0.0.0", args.port, settings,
                          args.certfile, args.keyfile)
    print(f"corral gateways of namespace {config.namespace} (tenants: {', '.join(tenants.names)}):")
    for row in rows:
        print(f"  {row['url']}   node {row['node_id'][:12]} ({row['node_ip']})")
    if not args.certfile and (args.host or "0.0.0.0") not in ("127.0.0.1", "localhost", "::1"):
        print("corral: warning: plain HTTP: tokens cross the network in clear (use --certfile/--keyfile or a "
              "TLS-terminating proxy)", file=sys.stderr)
    return 0
