"""`triton-rag prepare | serve`: what `make prepare` and `make serve` run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from triton_rag.repository import RepositoryError, prepare_repository, startup_models
from triton_rag.server import Ports, TritonServer
from triton_rag.settings import SettingsError, load_settings
from triton_rag.sources import ModelSourceError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _log(message: str) -> None:
    print(f"[triton-rag] {message}", file=sys.stderr, flush=True)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "rag.toml", help="settings file (rag.toml)")
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--cache-dir", type=Path, default=PROJECT_ROOT / ".cache")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a rag.toml value, e.g. --set embed.model=/models/Qwen3-Embedding-8B",
    )


def _prepare(args: argparse.Namespace) -> None:
    settings = load_settings(args.config if args.config.exists() else None, args.overrides)
    summary = prepare_repository(settings, args.repository, args.cache_dir, _log)
    for endpoint, chosen in summary.items():
        _log(f"{endpoint}: {chosen['model']} -> {chosen['path']} ({chosen['origin']})")
    router = settings.router
    if router.enabled:
        _log(f"router: budget {router.budget} (reserve {router.reserve}), high watermark {router.high_watermark}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-rag", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="resolve models and generate the model repository")
    _add_common(prepare)
    serve = commands.add_parser("serve", help="prepare, then run tritonserver in the foreground")
    _add_common(serve)
    serve.add_argument("--no-prepare", action="store_true", help="serve the repository as it is")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    flags = commands.add_parser(
        "load-flags", help="print the --load-model flags for tritonserver (the light models; the router loads the rest)"
    )
    flags.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    args = parser.parse_args(argv)
    if args.command == "load-flags":
        try:
            print(" ".join(f"--load-model={name}" for name in startup_models(args.repository)))
        except RepositoryError as exc:
            _log(f"error: {exc}")
            return 2
        return 0
    try:
        if args.command == "prepare" or not args.no_prepare:
            _prepare(args)
    except (SettingsError, ModelSourceError, RepositoryError) as exc:
        _log(f"error: {exc}")
        return 2
    if args.command == "serve":
        server = TritonServer(args.repository, args.cache_dir, Ports(args.http_port, args.grpc_port, args.metrics_port))
        _log(
            f"starting tritonserver: HTTP {args.http_port}, gRPC {args.grpc_port}, metrics {args.metrics_port} "
            "(Ctrl-C stops it)"
        )
        return server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
