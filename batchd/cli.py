"""`batchd serve --config config.toml --set batching.max_wait_ms=2`"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchd", description="Batching inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the configured model over HTTP")
    serve.add_argument("--config", default=None, help="path of config.toml (defaults when omitted)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config key; may be repeated")
    serve.add_argument("--bind", default=None, help="hypercorn bind (host:port, unix:PATH or fd://N); "
                       "overrides server.host/port")
    serve.add_argument("--model", dest="models", action="append", default=[], metavar="NAME",
                       help="serve only this model of the config (may be repeated; default: all)")
    serve.add_argument("--log-level", default="info")
    prepare = sub.add_parser("prepare", help="convert the configured GGUF models once (set-up; serving then loads in seconds)")
    prepare.add_argument("--config", default=None, help="path of config.toml (defaults when omitted)")
    prepare.add_argument("--log-level", default="info")
    ray_cmd = sub.add_parser("ray", help="serve replicas of batchd behind one endpoint on Ray Serve (pip install .[ray])")
    ray_cmd.add_argument("--config", default=None, help="path of config.toml (defaults when omitted)")
    ray_cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config key; may be repeated")
    ray_cmd.add_argument("--replicas", type=int, default=None, help="replicas (default: ray.num_replicas)")
    ray_cmd.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, or HOST:6379) "
                         "instead of starting a local one")
    ray_cmd.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, getattr(args, "overrides", []))
    except ConfigError as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "models", None):
        try:
            config = config.only(args.models)
        except ConfigError as exc:
            print(f"batchd: {exc}", file=sys.stderr)
            return 2
    if args.command == "prepare":
        from .backends.model_files import resolve_model_path

        for model in config.models:
            if model.backend != "fake":
                print(f"{model.name}: {resolve_model_path(model.path)}")
        return 0
    if args.command == "ray":
        try:
            from .ray.run import run as run_on_ray
        except ImportError as exc:
            print(f"batchd ray: Ray Serve is not installed ({exc}); pip install .[ray]", file=sys.stderr)
            return 2
        if args.replicas is not None and args.replicas < 1:
            print("batchd ray: --replicas must be >= 1", file=sys.stderr)
            return 2
        return run_on_ray(config, args.replicas, args.address)
    from .server import run  # heavy imports only once the config is known good

    return run(config, args.bind)
