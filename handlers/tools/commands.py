"""The server-side verbs of the `tritonvl` command (serve, gateway, make-tiny-model, export-onnx).

``tritonvl.client.cli`` imports this module only when one of them runs: the client (the base install,
no torch) imports no server code. Each function takes the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys


def needs_extra(command: str, extras: str, exc: Exception) -> int:
    """One line naming the missing extra (the server side imports torch & co. lazily); exit status 2."""
    print(f"{command} needs the {extras.replace(',', ' and ')} extra{'s' if ',' in extras else ''}: "
          f"pip install 'tritonvl[{extras}]' ({exc})", file=sys.stderr)
    return 2


def serve(args: argparse.Namespace) -> int:
    try:
        from tritonvl.handlers.params import ParamError
        from tritonvl.handlers.tools.launcher import serve as launch
        from tritonvl.handlers.tools.repository import parse_sets
    except ImportError as exc:
        return needs_extra("tritonvl serve", "server", exc)
    try:  # bad --set values stop here, before tritonserver starts
        overrides = parse_sets(args.set)
        return launch(args.model, args.http_port, args.grpc_port, args.metrics_port, args.device, args.extra,
                      overrides=overrides, openai_port=args.openai_port, openai_host=args.openai_host,
                      api_keys=args.api_key)
    except ParamError as exc:
        print(f"tritonvl serve: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # torch & co. are imported lazily, deep inside
        return needs_extra("tritonvl serve", "server", exc)


def gateway(args: argparse.Namespace) -> int:
    try:
        from tritonvl.handlers.gateway.app import run
        from tritonvl.handlers.gateway.config import API_KEY_ENV, GatewayConfig, api_keys, served_names
    except ImportError as exc:
        return needs_extra("tritonvl gateway", "gateway", exc)
    try:
        config = GatewayConfig(args.triton_url, args.triton_model,
                               served_names(args.model, args.served_model_name, args.triton_model),
                               int(args.max_body_mb * 2**20), args.max_concurrent, args.timeout,
                               api_keys=api_keys(args.api_key, os.environ.get(API_KEY_ENV)))
    except ValueError as exc:
        print(f"tritonvl gateway: {exc}", file=sys.stderr)
        return 2
    return run(config, args.host, args.port, args.log_level)


def make_tiny_model(args: argparse.Namespace) -> int:
    try:
        from tritonvl.handlers.tiny_model import build_tiny_model
    except ImportError as exc:
        return needs_extra("make-tiny-model", "server", exc)
    try:
        print(build_tiny_model(args.dir))
    except ModuleNotFoundError as exc:  # torch is imported inside
        return needs_extra("make-tiny-model", "server", exc)
    return 0


def export_onnx(args: argparse.Namespace) -> int:
    try:
        from tritonvl.handlers.vision.onnx_export import main
        return main(args.model, args.out, args.opset)
    except ModuleNotFoundError as exc:  # torch, onnx, onnxscript, onnxruntime are imported inside
        return needs_extra("export-onnx", "server,onnx", exc)
