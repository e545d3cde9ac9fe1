"""`tritonvl describe / chat / batch` against a real server."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys

import pytest
from PIL import Image

from tritonvl.client.cli import main


def write_png(path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 42), color).save(path)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "imgs"
    write_png(root / "a.png", (200, 10, 10))
    write_png(root / "sub" / "b.png", (10, 200, 10))
    Image.new("RGB", (40, 40), (0, 0, 250)).save(root / "sub" / "c.JPG", "JPEG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_describe_json(server, folder, capsys, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    code, out, err = run(capsys, "describe", str(folder / "a.png"), str(folder / "broken.jpg"), "--url", url,
                         "--protocol", protocol, "--max-tokens", "5", "--json")
    assert code == 1  # one image failed
    ok, bad = [json.loads(line) for line in out.splitlines()]
    assert ok["image"].endswith("a.png") and ok["text"] and ok["finish_reason"] == "length"
    assert ok["usage"]["output_tokens"] == 5 and ok["usage"]["images"] == 1 and ok["latency"] > 0
    assert bad["image"].endswith("broken.jpg") and "image[0]" in bad["error"]
    assert err.count("\n") == 1 and "broken.jpg" in err


def test_describe_stream_text(server, folder, capsys):
    code, out, _ = run(capsys, "describe", str(folder / "a.png"), "--url", server.grpc_url, "--max-tokens", "5",
                       "--stream", "--prompt", "What color?")
    code2, out2, _ = run(capsys, "describe", str(folder / "a.png"), "--url", "http://" + server.http_url,
                         "--max-tokens", "5", "--prompt", "What color?")
    assert code == code2 == 0
    assert out == out2 and out.strip()


def test_batch_with_a_broken_file_and_resume(server, folder, tmp_path, capsys):
    out_file = tmp_path / "captions.jsonl"
    args = ["batch", str(folder), "--out", str(out_file), "--url", server.grpc_url, "--max-tokens", "4",
            "--concurrency", "2"]
    code, _, err = run(capsys, *args)
    assert code == 0
    records = {r["path"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    assert sorted(records) == ["a.png", "broken.jpg", "sub/b.png", "sub/c.JPG"]
    assert "image[0]" in records["broken.jpg"]["error"]
    for key in ("a.png", "sub/b.png", "sub/c.JPG"):
        assert records[key]["text"] and records[key]["usage"]["output_tokens"] == 4 and records[key]["latency"] > 0
    assert "4/4" in err and "img/s" in err and "ETA" in err and "3 captioned, 1 failed" in err

    # re-run: nothing to do
    code, _, err = run(capsys, *args)
    assert code == 0 and "0 captioned, 0 failed, 4 already" in err
    assert len(out_file.read_text().splitlines()) == 4

    # a new image and an interrupted last line: only the new one is done, on a line of its own
    write_png(folder / "sub" / "d.png", (1, 2, 3))
    with out_file.open("a") as f:
        f.write('{"path": "sub/d.pn')
    code, _, err = run(capsys, *args[:-2], "--concurrency", "1", "--protocol", "http", "--url", server.http_url)
    assert code == 0 and "1 captioned, 0 failed, 4 already" in err
    last = json.loads(out_file.read_text().splitlines()[-1])
    assert last["path"] == "sub/d.png" and last["text"]

    # --retry-errors redoes the broken file (and records the error again)
    code, _, err = run(capsys, *args, "--retry-errors")
    assert "0 captioned, 1 failed, 4 already" in err


def test_chat_two_turns(server, folder, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd then?\n/exit\nnever read\n"))
    code, out, _ = run(capsys, "chat", "--url", server.grpc_url, "--image", str(folder / "a.png"),
                       "--max-tokens", "4")
    assert code == 0
    assert len(out.splitlines()) == 2 and all(line.strip() for line in out.splitlines())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,message", [
    (["describe", "IMG", "--url", "localhost:PORT"], "cannot reach a Triton server at localhost:PORT over gRPC"),
    (["describe", "IMG", "--url", "localhost:PORT", "--protocol", "http"], "over HTTP"),
    (["describe", "IMG", "--url", "SERVER", "--model", "nosuch"], "model 'nosuch' is not ready"),
    (["describe", "IMG", "--url", "SERVER", "--top-p", "3"], "top_p=3.0: must be in (0, 1]"),
    (["batch", "NOWHERE", "--out", "x.jsonl", "--url", "SERVER"], "not a directory"),
])
def test_errors_are_one_line(server, folder, tmp_path, argv, message):
    port = str(_free_port())
    argv = [a.replace("PORT", port).replace("SERVER", server.grpc_url).replace("IMG", str(folder / "a.png"))
            .replace("NOWHERE", str(tmp_path / "nowhere")) for a in argv]
    message = message.replace("PORT", port)
    proc = subprocess.run([sys.executable, "-m", "tritonvl.client.cli", *argv], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
