"""`triton-rag prepare | serve | plan | admin-key | load-flags | plan-shapes | record-plan`: what `make prepare`,
`make serve` and `make plan` run (the fit plan: will the configured models fit the GPU, before any download), and
the helpers for access control (README "Security") and engine builds (docs/ENGINES.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from triton_rag import contract
from triton_rag.build.fit import FitError, Memory, detect_gpu_memory, fit_plan, render_plan
from triton_rag.build.plans import Host, Manifest, configured_profiles, detect_host, manifest_file
from triton_rag.build.repository import RepositoryError, prepare_repository, startup_models
from triton_rag.build.settings import Settings, SettingsError, load_settings, profile_file, settings_file
from triton_rag.build.sources import ModelSourceError
from triton_rag.core import admin, logs
from triton_rag.core.measurements import ram_total
from triton_rag.server import (
    LOOPBACK,
    GatewayProcess,
    Ports,
    TritonServer,
    admin_key_file,
    gateway_command,
    resolve_admin_key,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Whole settings files for deployment targets (`--profile NAME` reads <PROFILES_DIR>/NAME.toml).
PROFILES_DIR = PROJECT_ROOT / "profiles"


_logger = logging.getLogger("triton_rag.cli")  # by name: `python -m triton_rag.cli` is __main__
#: Progress and status lines (stderr, `[triton-rag] ` before each: logs.configure in main); a command's result goes
#: to stdout through `_output`.
_log = _logger.info


def _output(text: str) -> None:
    """A command's result (the key, the flags): stdout, for the caller to read or capture."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _add_common(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="settings file (default: the project's rag.toml)")
    source.add_argument(
        "--profile",
        metavar="NAME_OR_PATH",
        help=f"a whole settings file for a deployment target instead of rag.toml: a name in {PROFILES_DIR} "
        "(e.g. rtx5070ti-16gb) or a path",
    )
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


def _settings_path(args: argparse.Namespace) -> Path | None:
    if args.profile is not None:
        return profile_file(args.profile, PROFILES_DIR)
    return settings_file(args.config, PROJECT_ROOT / "rag.toml")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_settings_path(args), args.overrides)


def _prepare(args: argparse.Namespace) -> None:
    settings = _settings(args)
    host = detect_host()
    if args.tensorrt_version:  # an image with TensorRT's libraries but not its Python package
        host = Host(host.capability, {**host.versions, "tensorrt": args.tensorrt_version})
        _log(f"TensorRT version {args.tensorrt_version} as given (--tensorrt-version)")
    summary = prepare_repository(settings, args.repository, args.cache_dir, _log, host=host)
    for endpoint, chosen in summary.items():
        _log(f"{endpoint}: {chosen.model} -> {chosen.path} ({chosen.origin})")
    router = settings.router
    if router.enabled:
        _log(
            f"router: budget {router.budget} (reserve {router.reserve}, device memory {router.device_memory}), "
            f"high watermark {router.high_watermark}"
        )


def _plan(args: argparse.Namespace) -> None:
    """Per compute model its bytes part by part, which models co-reside and the steady state, from files on disk
    and the known shapes: nothing is downloaded. FitError when a model cannot fit even alone."""
    overrides = list(args.overrides)
    if args.device_memory:
        overrides.append(f"router.device_memory={args.device_memory}")
    path = _settings_path(args)
    settings = load_settings(path, overrides)
    ram = ram_total()
    memory = Memory.planned(settings.router, detect_gpu_memory(), ram)
    plan = fit_plan(settings, args.repository, args.cache_dir, memory, ram)
    _output(render_plan(plan, f"fit plan for {path or 'the built-in defaults'}"))


def _plan_shapes(args: argparse.Namespace) -> None:
    """trtexec's shape flags per encoder, from rag.toml (docs/ENGINES.md uses them)."""
    for name, profiles in configured_profiles(_settings(args)).items():
        shapes = [profile.trtexec() for profile in profiles]
        flags = [",".join(shape[i] for shape in shapes) for i in range(3)]
        _output(f"{name}: --minShapes={flags[0]} --optShapes={flags[1]} --maxShapes={flags[2]}")


def _record_plan(args: argparse.Namespace) -> None:
    """Write the manifest beside a plan just built on this machine (its GPU and TensorRT version)."""
    host = detect_host()
    capability = tuple(int(x) for x in args.capability.split(".")) if args.capability else host.capability
    version = args.tensorrt_version or host.versions.get("tensorrt")
    if capability is None or version is None:
        raise RepositoryError(
            "record-plan runs where the plan was built: it needs the GPU and the tensorrt package "
            "(or --capability and --tensorrt-version, as trtexec --version and nvidia-smi report them)"
        )
    if not args.engine.exists():
        raise RepositoryError(f"{args.engine} does not exist")
    settings = _settings(args)
    configured = settings.embed.model if args.encoder == contract.EMBED_ENCODER else settings.rerank.model
    manifest = Manifest(
        source_model=args.source_model or configured,  # prepare serves the plan only for this model
        contract=args.encoder,
        precision=args.precision,
        runtime="tensorrt",
        runtime_version=version,
        compute_capability=capability,  # type: ignore[arg-type]
        profiles=configured_profiles(settings)[args.encoder],
    )
    manifest_file(args.engine).write_text(manifest.to_json())
    _log(f"wrote {manifest_file(args.engine)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triton-rag", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="resolve models and generate the model repository")
    serve = commands.add_parser("serve", help="prepare, then run tritonserver in the foreground")
    for command in (prepare, serve):
        _add_common(command)
        command.add_argument(
            "--tensorrt-version",
            help="the serving TensorRT's version, where its Python package is not installed (as trtexec prints it)",
        )
    serve.add_argument("--no-prepare", action="store_true", help="serve the repository as it is")
    serve.add_argument(
        "--host", default=LOOPBACK, help=f"address to listen on (default {LOOPBACK}: this machine only; 0.0.0.0: all)"
    )
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument(
        "--gateway",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start the HTTP gateway (OpenAI embeddings, Cohere/Jina rerank, docling-serve conversion) beside "
        "tritonserver (default: rag.toml [gateway] enabled)",
    )
    serve.add_argument("--gateway-host", help="the gateway's address (default: rag.toml [gateway] host, 127.0.0.1)")
    serve.add_argument("--gateway-port", type=int, help="the gateway's port (default: rag.toml [gateway] port, 8080)")
    key = commands.add_parser(
        "admin-key",
        help=f"print the admin key serve uses (${admin.KEY_ENV}, else <cache-dir>/admin.key, made if missing)",
    )
    key.add_argument("--cache-dir", type=Path, default=PROJECT_ROOT / ".cache")
    flags = commands.add_parser(
        "load-flags", help="print the --load-model flags for tritonserver (the light models; the router loads the rest)"
    )
    flags.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    plan = commands.add_parser(
        "plan", help="will the configured models fit? bytes per model, co-residence, steady state (no download)"
    )
    _add_common(plan)
    plan.add_argument(
        "--device-memory",
        metavar="BYTES",
        help="plan for a GPU of this much memory (e.g. 16GiB; sets [router] device_memory for the plan)",
    )
    shapes = commands.add_parser("plan-shapes", help="print trtexec's shape flags per encoder (docs/ENGINES.md)")
    _add_common(shapes)
    record = commands.add_parser("record-plan", help="write the manifest beside a TensorRT plan built here")
    _add_common(record)
    record.add_argument("--engine", type=Path, required=True, help="the plan, e.g. .cache/engines/<encoder>/model.plan")
    record.add_argument("--encoder", required=True, choices=[contract.EMBED_ENCODER, contract.RERANK_ENCODER])
    record.add_argument("--precision", required=True, choices=["nvfp4", "fp8", "float16", "float32"])
    record.add_argument(
        "--source-model", help="what the ONNX was exported from (default: the configured model, as make engines used)"
    )
    record.add_argument("--capability", help="the GPU's compute capability, e.g. 12.0 (default: detected)")
    record.add_argument("--tensorrt-version", help="e.g. 10.13.3.9 (default: the tensorrt package's)")
    args = parser.parse_args(argv)
    logs.configure("stderr", fmt="[triton-rag] %(message)s")
    if args.command == "admin-key":
        _output(resolve_admin_key(args.cache_dir))
        return 0
    if args.command == "load-flags":
        try:
            _output(" ".join(f"--load-model={name}" for name in startup_models(args.repository)))
        except RepositoryError as exc:
            _logger.error(f"error: {exc}")
            return 2
        return 0
    try:
        if args.command == "plan":
            _plan(args)
            return 0
        if args.command == "plan-shapes":
            _plan_shapes(args)
            return 0
        if args.command == "record-plan":
            _record_plan(args)
            return 0
        if args.command == "prepare" or not args.no_prepare:
            _prepare(args)
    except (SettingsError, ModelSourceError, RepositoryError, FitError) as exc:
        _logger.error(f"error: {exc}")
        return 2
    if args.command == "serve":
        ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
        try:
            server = TritonServer(args.repository, args.cache_dir, ports, host=args.host)
            gateway = _gateway(args, server)
        except (ValueError, SettingsError) as exc:  # an admin key that cannot be a header value, a gateway setting
            _logger.error(f"error: {exc}")
            return 2
        key_source = admin.KEY_ENV if os.environ.get(admin.KEY_ENV, "").strip() else admin_key_file(args.cache_dir)
        _log(
            f"starting tritonserver on {args.host}: HTTP {args.http_port}, gRPC {args.grpc_port}, metrics "
            f"{args.metrics_port}; the repository API needs the admin key ({key_source}) (Ctrl-C stops it)"
        )
        from triton_rag.client import RouterControl

        router = RouterControl(server.grpc_url, key=server.admin_key)
        return server.serve_forever(gateway=gateway, wedged=router.wedged, stop_router=router.stop)
    return 0


def _gateway(args: argparse.Namespace, server: TritonServer) -> GatewayProcess | None:
    """The gateway process `serve` starts beside tritonserver, or None (turned off). Refused here, before anything
    starts, where it would listen beyond loopback without API keys (unless rag.toml allows that)."""
    from triton_rag.gateway.__main__ import api_keys, exposure_problem

    overrides = list(args.overrides)
    if args.gateway_host:
        overrides.append(f"gateway.host={args.gateway_host}")
    if args.gateway_port:
        overrides.append(f"gateway.port={args.gateway_port}")
    path = _settings_path(args)
    settings = load_settings(path, overrides).gateway
    enabled = settings.enabled if args.gateway is None else args.gateway
    if not enabled:
        return None
    problem = exposure_problem(settings.host, api_keys(settings), settings.allow_insecure_public)
    if problem:
        raise SettingsError(f"{problem} (or serve --no-gateway)")
    _log(
        f"starting the gateway on http://{settings.host}:{settings.port} (OpenAI /v1/embeddings, /v1/rerank, "
        "/v2/rerank, /v1/convert/*; --no-gateway turns it off)"
    )
    command = gateway_command(args.repository, server.grpc_url, settings.host, settings.port, path, overrides)
    return GatewayProcess(command)


if __name__ == "__main__":
    sys.exit(main())
