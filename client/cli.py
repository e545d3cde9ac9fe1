"""The `tritonvl` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from .rules.sampling import CLI_FIELDS


def _server_command(name: str, extras: str):
    """A server-side verb (serve, gateway, make-tiny-model, export-onnx): run by
    ``tritonvl.handlers.tools.commands``, imported only when asked, so the client imports no server code."""

    def run(args: argparse.Namespace) -> int:
        try:
            commands = importlib.import_module("tritonvl.handlers.tools.commands")
        except ImportError as exc:
            print(f"tritonvl {name} needs the {extras} extra: pip install 'tritonvl[{extras}]' ({exc})",
                  file=sys.stderr)
            return 2
        return getattr(commands, name.replace("-", "_"))(args)

    return run


def _client_command(name: str):
    """Run a client command; its errors become one line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from .errors import TritonVLError

        if name == "batch":
            from .batch import batch as command
        else:
            from . import commands

            command = getattr(commands, name)
        try:
            return command(args)
        except (TritonVLError, OSError, ValueError) as exc:
            print(f"tritonvl {name}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"tritonvl {name}: interrupted", file=sys.stderr)
            return 130

    return run


def _connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--url", help="HOST:PORT of the server (default: $TRITONVL_URL, else localhost:8001 for "
                                 "gRPC, localhost:8000 for HTTP; an http:// prefix selects HTTP)")
    g.add_argument("--protocol", choices=["grpc", "http"], help="default: grpc (or the URL's scheme)")
    g.add_argument("--model", default="qwen2_5_vl", help="model name (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    g.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="sent with every request, e.g. 'Authorization: Bearer TOKEN' (repeatable)")
    g.add_argument("--tls", action="store_true", help="TLS (implied by an https:// or grpcs:// URL)")
    g.add_argument("--ca-file", help="PEM file of the CA that signed the server's certificate "
                                     "(default: the system's roots)")


def _sampling_options(p: argparse.ArgumentParser, prompt: bool = True) -> None:
    g = p.add_argument_group("generation")
    if prompt:
        g.add_argument("--prompt", help="question about each image or video (default: 'Describe this image.', "
                                        "for a video 'Describe this video.')")
    for f in CLI_FIELDS:  # the sampling table's fields that have a flag
        flag = "--" + f.name.replace("_", "-")
        if f.kind == "strs":
            g.add_argument(flag, action="append", default=[], metavar="TEXT", help=f.cli)
        else:
            g.add_argument(flag, type=f.python_type, help=f.cli)


def _video_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fps", type=float, help="frames the server samples per second of each video (its default: 2)")
    g.add_argument("--num-frames", type=int, help="frames the server samples from each video, evenly spread")


def _api_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="the gateway answers only requests that send 'Authorization: Bearer KEY' (repeatable: "
                        "any of them; /health and /metrics stay open). Default: $TRITONVL_API_KEY, one key per "
                        "line; the environment keeps a key out of process listings, this flag does not")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonvl", description="Serve and call Qwen2.5-VL on Triton.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="describe images and videos (one request each)",
                       description="Ask the model about each IMAGE (a path or an http(s) URL) and each --video, and "
                                   "print the answers. Exit status 1 if any failed.",
                       epilog="example: tritonvl describe cat.jpg --video clip.mp4 --url localhost:8001 --stream")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image file or http(s) URL")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video file (MP4, WebM, GIF, ...) to describe (repeatable)")
    _video_sampling_options(p)
    _connection_options(p)
    _sampling_options(p)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated (and measure TTFT)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per image or video on stdout: image (or video), text, finish_reason, "
                        "usage, latency, ttft")
    p.set_defaults(func=_client_command("describe"))

    p = sub.add_parser("chat", help="interactive multi-turn chat, optionally about an image or videos",
                       description="Chat on stdin/stdout. The image and videos are read once and kept in the first "
                                   "turn; /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply.",
                       epilog="example: tritonvl chat --image photo.png --url localhost:8001")
    p.add_argument("--image", help="image file or http(s) URL to talk about")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video file to talk about (repeatable; after the image in the first turn)")
    _video_sampling_options(p)
    p.add_argument("--system", help="system prompt")
    _connection_options(p)
    _sampling_options(p, prompt=False)
    p.set_defaults(func=_client_command("chat"))

    p = sub.add_parser("batch", help="caption every image (and video) under a folder into a JSONL file",
                       description="Caption every image under DIR (recursive; jpg, jpeg, png, webp, bmp, gif) "
                                   "and every video (mp4, webm, mkv, mov, avi, m4v) "
                                   "into FILE.jsonl, one line per file: path (relative to DIR), text, "
                                   "finish_reason, usage, latency, or error. Images that fail are recorded and "
                                   "the run goes on; re-running skips paths already in the output. Exit status "
                                   "0 when the run completes, 1 when it cannot (server down, bad arguments).",
                       epilog="example: tritonvl batch photos/ --out captions.jsonl --concurrency 8")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file (appended to)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    p.add_argument("--retry-errors", action="store_true", help="also redo images whose last record is an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _connection_options(p)
    _sampling_options(p)
    p.set_defaults(func=_client_command("batch"))

    p = sub.add_parser("ground", help="find an object in an image: boxes in the image's own pixels, drawn",
                       description="Ask the served model where TARGET is in IMAGE (Qwen's grounding prompt), map "
                                   "the boxes and points of its answer to IMAGE's own pixels (by the size the "
                                   "model saw and its family's grid, which the server reports) and print them as "
                                   "JSON; --out draws them on a copy of the image. Exit status 1 when the answer "
                                   "has no box or point.",
                       epilog='example: tritonvl ground street.jpg "the red car" --out boxed.png')
    p.add_argument("image", metavar="IMAGE", help="image file or http(s) URL")
    p.add_argument("target", metavar="TARGET", help='what to find, e.g. "the red car"')
    p.add_argument("--out", metavar="FILE.png", help="write a copy of IMAGE with the boxes, points and labels drawn")
    p.add_argument("--prompt", help="the whole question instead of Qwen's grounding prompt for TARGET")
    p.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"],
                   help="read the answer on this family's grid instead of the served model's")
    p.add_argument("--answer", metavar="TEXT",
                   help="map and draw TEXT instead of the model's answer (replaying a saved answer; the image "
                        "is still sent, for the sizes the model would see)")
    _connection_options(p)
    _sampling_options(p, prompt=False)
    p.set_defaults(func=_client_command("ground"))

    p = sub.add_parser("serve", help="run tritonserver on model_repository/",
                       description="Run tritonserver on this project's model repository. Arguments after "
                                   "'--' go to tritonserver unchanged.")
    p.add_argument("--model", help="Qwen2.5-VL model directory (default: the embedded tiny model)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int, default=0, metavar="PORT",
                   help="also run the OpenAI-compatible gateway on PORT (e.g. 9000; default: off; docs/OPENAI.md)")
    p.add_argument("--openai-host", default="127.0.0.1", metavar="ADDRESS",
                   help="address the gateway listens on (default: %(default)s, this machine only; 0.0.0.0 for all)")
    _api_key_option(p)
    p.add_argument("--device", choices=["cpu", "cuda", "npu"], default="",
                   help="force a device for every model (default: what the instance groups say)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="override a model parameter for this run, e.g. llm.max_num_seqs=16, "
                        "llm.instance_kind=KIND_GPU, vision_encoder.instance_count=2 (repeatable; serves a "
                        "copy of the repository; keys: docs/PARAMETERS.md)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- extra tritonserver arguments")
    p.set_defaults(func=_server_command("serve", "server"))

    p = sub.add_parser("gateway", help="OpenAI-compatible HTTP API in front of a Triton server",
                       description="Serve /v1/chat/completions (with image_url and video_url parts), /v1/completions, "
                                   "/v1/models, /health, /metrics and /describe-image/ in front of a tritonvl Triton server, "
                                   "which it calls over gRPC streaming. Needs no torch (docs/OPENAI.md).",
                       epilog="example: tritonvl gateway --triton-url triton-0:8001 --port 9000 "
                              "--model /models/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--triton-url", default="localhost:8001", help="Triton's gRPC HOST:PORT (default: %(default)s)")
    p.add_argument("--port", type=int, default=9000, help="HTTP port (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument("--model", help="the served model name as clients send it (vLLM's rule: the --model argument "
                                   "as given, e.g. a path); default: the Triton model's name")
    p.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="name(s) clients use instead of --model (repeatable; the first is the one answers carry)")
    p.add_argument("--triton-model", default="qwen2_5_vl", help="the public model on Triton (default: %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=512,
                   help="requests in flight; more are refused with 429 (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=64, help="request body limit, MiB (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per generation (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _api_key_option(p)
    p.set_defaults(func=_server_command("gateway", "gateway"))

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight Qwen2.5-VL to DIR")
    p.add_argument("dir")
    p.set_defaults(func=_server_command("make-tiny-model", "server"))

    p = sub.add_parser("export-onnx", help="export the vision tower of a model to ONNX (docs/ONNX.md)",
                       description="Write the vision tower as an ONNX graph (fp32, dynamic patch count), check it "
                                   "with onnx.checker, run a few images through it and through transformers and "
                                   "print the largest relative difference (exit 1 above 1e-4).")
    p.add_argument("--model", help="Qwen2.5-VL model directory (default: the embedded tiny model)")
    p.add_argument("--out", metavar="FILE", help="output file (default: DIR/onnx/vision_encoder.onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    p.set_defaults(func=_server_command("export-onnx", "server,onnx"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "extra", None) and args.extra[:1] == ["--"]:
        args.extra = args.extra[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
