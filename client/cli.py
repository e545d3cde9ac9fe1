"""The `tritonvl` command."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    try:
        from tritonvl.handlers.launcher import serve
    except ImportError as exc:
        print(f"tritonvl serve needs the server extra: pip install 'tritonvl[server]' ({exc})", file=sys.stderr)
        return 2
    return serve(args.model, args.http_port, args.grpc_port, args.metrics_port, args.device, args.extra)


def _make_tiny_model(args: argparse.Namespace) -> int:
    try:
        from tritonvl.handlers.tiny_model import build_tiny_model
    except ImportError as exc:
        print(f"make-tiny-model needs the server extra: pip install 'tritonvl[server]' ({exc})", file=sys.stderr)
        return 2
    print(build_tiny_model(args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonvl", description="Serve and call Qwen2.5-VL on Triton.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run tritonserver on model_repository/",
                       description="Run tritonserver on this project's model repository. Arguments after "
                                   "'--' go to tritonserver unchanged.")
    p.add_argument("--model", help="Qwen2.5-VL model directory (default: the embedded tiny model)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--device", choices=["cpu", "cuda", "npu"], default="",
                   help="force a device for every model (default: what the instance groups say)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- extra tritonserver arguments")
    p.set_defaults(func=_serve)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight Qwen2.5-VL to DIR")
    p.add_argument("dir")
    p.set_defaults(func=_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "extra", None) and args.extra[:1] == ["--"]:
        args.extra = args.extra[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
