"""`tritonvl describe`, `tritonvl chat` and `tritonvl ground`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .client import Client
from .errors import ModelNotReady, ServerUnavailable, TritonVLError
from .images import describe_source, load_image
from .params import SamplingParams
from .rules.media import coordinates_of
from .rules.sampling import CLI_FIELDS
from .videos import describe_video, load_video

DEFAULT_PROMPT = "Describe this image."
DEFAULT_VIDEO_PROMPT = "Describe this video."
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
    kwargs = {f.name: getattr(args, f.name) for f in CLI_FIELDS if getattr(args, f.name, None) not in (None, [])}
    SamplingParams.from_kwargs(**kwargs)  # fail before connecting, once
    return kwargs


def open_client(args: argparse.Namespace) -> Client:
    url, protocol = connection(args)
    client = Client(url, protocol, model=args.model, timeout=args.timeout, **client_options(args))
    client.check_ready()
    return client


def prompt_for(args: argparse.Namespace, kind: str) -> str:
    """--prompt, else the default question for an image or a video."""
    return args.prompt or (DEFAULT_VIDEO_PROMPT if kind == "video" else DEFAULT_PROMPT)


def video_keys(args: argparse.Namespace) -> dict:
    """--fps / --num-frames as the keys of a video part (the server samples by them)."""
    keys = {"fps": getattr(args, "fps", None), "num_frames": getattr(args, "num_frames", None)}
    return {k: v for k, v in keys.items() if v is not None}


def describe(args: argparse.Namespace) -> int:
    items = [("image", p) for p in args.images] + [("video", p) for p in getattr(args, "video", None) or []]
    if not items:
        raise TritonVLError("give at least one IMAGE or --video PATH")
    failed = 0
    params = sampling(args)
    with open_client(args) as client:
        for kind, path in items:
            try:
                prompt = prompt_for(args, kind)
                if kind == "video" and video_keys(args):  # sampling keys ride on the video's message part
                    video = load_video(path, client.video_options)
                    prompt, media = None, {"messages": [_user_turn(prompt, None, [video], video_keys(args))]}
                elif kind == "video":
                    media = {"videos": [load_video(path, client.video_options)]}
                else:
                    media = {"images": [load_image(path, client.image_options)]}
                if args.stream:
                    stream = client.stream(prompt, **media, **params)
                    if not args.json:
                        _header(items, path)
                    for delta in stream:
                        if not args.json:
                            sys.stdout.write(delta)
                            sys.stdout.flush()
                    result = stream.result
                    if not args.json:
                        sys.stdout.write("\n")
                elif "messages" in media:
                    result = client.chat(media["messages"], **params)
                else:
                    result = client.generate(prompt, **media, **params)
                    if not args.json:
                        _header(items, path)
                        print(result.text)
            except (ServerUnavailable, ModelNotReady):
                raise
            except TritonVLError as exc:
                failed += 1
                if args.json:
                    print(json.dumps({kind: str(path), "error": str(exc)}, ensure_ascii=False), flush=True)
                name = describe_video(path) if kind == "video" else describe_source(path)
                message = str(exc) if name in str(exc) else f"{path}: {exc}"
                print(f"tritonvl describe: error: {message}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({kind: str(path), **result.to_dict()}, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def _header(items: list, path: str) -> None:
    if len(items) > 1:
        print(f"== {path} ==")


def chat(args: argparse.Namespace) -> int:
    """A multi-turn chat on stdin/stdout. The image and videos are read once and kept in the first user turn."""
    interactive = sys.stdin.isatty()
    params = sampling(args)
    with open_client(args) as client:
        image = load_image(args.image, client.image_options) if args.image else None
        videos = [load_video(v, client.video_options) for v in getattr(args, "video", None) or []]
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
            turn = _user_turn(line, image if not history else None, videos if not history else [], video_keys(args))
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


def ground(args: argparse.Namespace) -> int:
    """One grounding request: the boxes in IMAGE's pixels as JSON on stdout, drawn with --out."""
    from .grounding import draw, grounding_prompt
    from .grounding import ground as to_pixels

    params = sampling(args)
    if args.answer is not None:  # only the sizes are wanted of the server
        params.setdefault("max_tokens", 1)
    with open_client(args) as client:
        image = load_image(args.image, client.image_options)
        result = client.generate(args.prompt or grounding_prompt(args.target), images=[image], **params)
    answer = result.text if args.answer is None else args.answer
    items = to_pixels(answer, result.media, family=args.family)
    size = result.media.images[0]
    family = args.family or result.media.family
    coordinates = coordinates_of(args.family) if args.family else result.media.coordinates
    print(json.dumps({"image": str(args.image), "target": args.target, "family": family, "coordinates": coordinates,
                      "width": size.width, "height": size.height, "resized_width": size.resized_width,
                      "resized_height": size.resized_height, "answer": answer,
                      "boxes": [g.to_dict() for g in items]}, ensure_ascii=False))
    if args.out:
        draw(image, items, args.out)
    if not items:
        print("tritonvl ground: the answer has no box or point", file=sys.stderr)
    return 0 if items else 1


def _user_turn(text: str, image: bytes | str | None, videos: list[bytes | str], keys: dict | None = None) -> dict:
    if image is None and not videos:
        return {"role": "user", "content": text}
    media = ([{"type": "image", "image": image}] if image is not None else []) + [
        {"type": "video", "video": v, **(keys or {})} for v in videos]
    return {"role": "user", "content": media + [{"type": "text", "text": text}]}

