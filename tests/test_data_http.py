"""Shards over HTTP (issue 14 item 7), served from 127.0.0.1: the stream is the very stream of the
same shards read from disk; a connection dropped mid-shard is resumed (same batches, nothing
skipped); a shard that keeps dropping is skipped and counted and training goes on; a server that is
down at start is an error naming the URL."""

import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from ditkit.data import LatentShardsDataModule, remote

PATTERN = "train-{000000..000003}.tar"


class DroppingHandler(SimpleHTTPRequestHandler):
    """Serves the folder; a shard named in `drops` has its connection cut halfway through its
    body, `drops[name]` times (-1: every time). Plain GET only, no Range support, like
    http.server: a resume re-reads the skipped bytes. Records each request's path."""

    drops: dict[str, int] = {}
    log: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        type(self).log.append(name)
        left = self.drops.get(name, 0)
        if left == 0 or "Range: bytes=0-0" in str(self.headers).replace("\r", ""):
            return super().do_GET()
        self.drops[name] = left - 1 if left > 0 else -1
        data = open(self.directory + "/" + name, "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # the drop, mid-body


@pytest.fixture
def server(tmp_path, write_synthetic_shards):
    root = write_synthetic_shards(tmp_path / "shards", num_samples=32)
    DroppingHandler.drops, DroppingHandler.log = {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(DroppingHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def datamodule(**where):
    return LatentShardsDataModule(
        latent_size=8,
        latent_channels=4,
        num_classes=10,
        image_size=8,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        return_keys=True,
        **where,
    )


def batches(dm, n=16):
    loader = dm.train_dataloader()
    return [b for _, b in zip(range(n), (b for _ in range(4) for b in loader))]


def assert_same(a, b):
    assert len(a) == len(b) == 16
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])


def test_http_shards_give_the_stream_of_the_same_shards_on_disk(server):
    root, base = server
    local = batches(datamodule(urls=str(root / PATTERN)))
    dm = datamodule(urls=f"{base}/{PATTERN}")
    assert_same(batches(dm), local)
    assert dm.skipped == 0 and "manifest.json" in DroppingHandler.log


def test_a_connection_dropped_mid_shard_is_resumed(server):
    root, base = server
    local = batches(datamodule(urls=str(root / PATTERN)))
    DroppingHandler.drops = {"train-000001.tar": 2, "train-000002.tar": 1}
    dm = datamodule(urls=f"{base}/{PATTERN}")
    assert_same(batches(dm), local)  # every sample arrived, in order
    assert dm.skipped == 0
    assert DroppingHandler.drops == {"train-000001.tar": 0, "train-000002.tar": 0}


def test_a_shard_that_keeps_dropping_is_skipped_and_counted(server, monkeypatch):
    monkeypatch.setattr(remote, "RETRIES", 2)
    root, base = server
    DroppingHandler.drops = {"train-000003.tar": -1}
    dm = datamodule(urls=f"{base}/{PATTERN}")
    got = batches(dm)
    assert len(got) == 16  # training goes on
    assert dm.skipped >= 1
    # 1 GET and 2 reconnections per read of the bad shard
    reads = DroppingHandler.log.count("train-000003.tar")
    assert reads >= 3 and reads % 3 == 0


def test_a_server_down_at_start_is_named():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{PATTERN}"
    dm = datamodule(urls=url)
    with pytest.raises(
        ConnectionError, match=f"cannot reach http://127.0.0.1:{port}/manifest.json"
    ):
        dm.setup()


def test_a_missing_shard_on_the_server_is_named(server):
    root, base = server
    dm = datamodule(urls=f"{base}/train-{{000007..000009}}.tar", manifest=f"{base}/manifest.json")
    with pytest.raises(FileNotFoundError, match=f"{base}/train-000007.tar answers HTTP 404"):
        dm.setup()
