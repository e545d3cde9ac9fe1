"""`tritonvl describe` and `tritonvl chat`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .client import Client
from .errors import ModelNotReady, ServerUnavailable, TritonVLError
from .images import describe_source, load_image
from .params import SamplingParams

DEFAULT_PROMPT = "Describe this image."
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


def connection(args: argparse.Namespace) -> tuple[str, str]:
    """(url, protocol): the protocol from --protocol, else the URL's scheme, else gRPC."""
    url = args.url or os.environ.get("TRITONVL_URL", "")
    protocol = args.protocol
    if protocol is None:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        protocol = "http" if scheme in ("http", "https") else "grpc"
    return (url or f"localhost:{DEFAULT_PORTS[protocol]}"), protocol


def client_options(args: argparse.Namespace) -> dict:
    """Client keyword arguments of --header (NAME: VALUE), --tls and --ca-file."""
    headers = {}
    for item in getattr(args, "header", None) or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {item!r}: expected 'NAME: VALUE'")
        headers[name.strip()] = value.strip()
    return {"headers": headers, "tls": bool(getattr(args, "tls", False)), "ca_file": getattr(args, "ca_file", None)}


def sampling(args: argparse.Namespace) -> dict:
    """SamplingParams keyword arguments from the common options (unset ones left out), checked."""
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) not in (None, [])}
    SamplingParams.from_kwargs(**kwargs)  # fail before connecting, once
    return kwargs


def open_client(args: argparse.Namespace) -> Client:
    url, protocol = connection(args)
    client = Client(url, protocol, model=args.model, timeout=args.timeout, **client_options(args))
    client.check_ready()
    return client


def describe(args: argparse.Namespace) -> int:
    failed = 0
    params = sampling(args)
    with open_client(args) as client:
        for path in args.images:
            try:
                data = load_image(path, client.image_options)
                if args.stream:
                    stream = client.stream(args.prompt, images=[data], **params)
                    if not args.json:
                        _header(args, path)
                    for delta in stream:
                        if not args.json:
                            sys.stdout.write(delta)
                            sys.stdout.flush()
                    result = stream.result
                    if not args.json:
                        sys.stdout.write("\n")
                else:
                    result = client.generate(args.prompt, images=[data], **params)
                    if not args.json:
                        _header(args, path)
                        print(result.text)
            except (ServerUnavailable, ModelNotReady):
                raise
            except TritonVLError as exc:
                failed += 1
                if args.json:
                    print(json.dumps({"image": str(path), "error": str(exc)}, ensure_ascii=False), flush=True)
                message = str(exc) if describe_source(path) in str(exc) else f"{path}: {exc}"
                print(f"tritonvl describe: error: {message}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({"image": str(path), **result.to_dict()}, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def _header(args: argparse.Namespace, path: str) -> None:
    if len(args.images) > 1:
        print(f"== {path} ==")


def chat(args: argparse.Namespace) -> int:
    """A multi-turn chat on stdin/stdout. The image is read once and kept in the first user turn."""
    interactive = sys.stdin.isatty()
    params = sampling(args)
    with open_client(args) as client:
        image = load_image(args.image, client.image_options) if args.image else None
        history: list[dict] = []
        if interactive:
            print("tritonvl chat: /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                line = input("you> ") if interactive else sys.stdin.readline()
            except EOFError:
                line = ""
            if not line:
                break
            line = line.strip()
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = []
                continue
            if not line:
                continue
            turn = _user_turn(line, image if not history else None)
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + history + [turn]
            if interactive:
                sys.stdout.write("assistant> ")
            stream = client.stream(messages=messages, **params)
            try:
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
                stream.cancel()
                stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
            history += [turn, {"role": "assistant", "content": stream.result.text if stream.result else ""}]
    return 0


def _user_turn(text: str, image: bytes | str | None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}

