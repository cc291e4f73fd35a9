"""Shards over HTTP(S): how object stores (S3/GCS/R2 public or presigned URLs) and CDNs are read.

`data.urls='https://HOST/in256/train-{000000..001281}.tar'` streams each shard with one GET. A
connection that drops mid-shard is resumed where it broke, with a `Range: bytes=<offset>-` request
(or, from a server that ignores ranges, the same GET with the bytes already read skipped), up to
`RETRIES` times with exponential backoff (`BACKOFF_S`, doubling, at most `MAX_BACKOFF_S`); past that
the shard's stream raises and the training stream skips and counts the rest of the shard
(`data/skipped`), and goes on. A server that cannot be reached at start is a clear error naming the
URL (`check_reachable`), before any training.

Other URLs (local paths, `pipe:` commands, `s3://` through WebDataset's handlers) open with
`webdataset.gopen` as before.
"""

from __future__ import annotations

import http.client
import io
import logging
import time
import urllib.error
import urllib.request
from typing import IO

import webdataset as wds

log = logging.getLogger(__name__)

RETRIES = 5  # reconnections per shard after a drop
BACKOFF_S = 0.5  # first wait before reconnecting; doubles each time
MAX_BACKOFF_S = 8.0
TIMEOUT_S = 30.0  # connect / read timeout of one request
# What a dropped or stalled connection raises while reading a response body.
_DROPS = (http.client.HTTPException, ConnectionError, TimeoutError, OSError)


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class ResumingHTTPStream(io.RawIOBase):
    """A readable stream of one HTTP resource that reconnects (Range request) after a drop."""

    def __init__(self, url: str, retries: int | None = None, backoff: float | None = None):
        super().__init__()
        self.url = url
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF_S if backoff is None else backoff
        self.pos = 0
        self.length: int | None = None
        self.reconnects = 0
        self._response = self._request()

    def _request(self):
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        response = urllib.request.urlopen(
            urllib.request.Request(self.url, headers=headers), timeout=TIMEOUT_S
        )
        if self.length is None:
            size = response.headers.get("Content-Length")
            self.length = int(size) if size is not None else None
        if self.pos and response.status != 206:  # the server ignored the range: skip what we have
            skip = self.pos
            while skip:
                chunk = response.read(min(skip, 1 << 20))
                if not chunk:
                    raise http.client.IncompleteRead(b"", skip)
                skip -= len(chunk)
        return response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self.backoff
        while True:
            try:
                n = self._response.readinto(buffer)
                if n == 0 and self.length is not None and self.pos < self.length:
                    raise http.client.IncompleteRead(b"", self.length - self.pos)
                self.pos += n
                return n
            except _DROPS as err:
                if self.reconnects >= self.retries:
                    raise ConnectionError(
                        f"{self.url}: connection lost at byte {self.pos} after {self.retries} "
                        f"reconnections ({type(err).__name__}: {err})"
                    ) from err
                self.reconnects += 1
                log.warning(
                    "%s: connection lost at byte %d (%s); reconnecting in %.1f s (%d/%d)",
                    self.url,
                    self.pos,
                    type(err).__name__,
                    wait,
                    self.reconnects,
                    self.retries,
                )
                time.sleep(wait)
                wait = min(2 * wait, MAX_BACKOFF_S)
                try:
                    self._response.close()
                    self._response = self._request()
                except _DROPS:
                    continue  # counted as the next failed attempt by the read above

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()


def open_shard(url: str) -> IO[bytes]:
    """A shard's bytes: resumable HTTP(S), else whatever `webdataset.gopen` opens."""
    if is_http(url):
        return io.BufferedReader(ResumingHTTPStream(url), buffer_size=1 << 20)
    return wds.gopen(url, "rb")


def check_reachable(url: str, what: str = "data.urls") -> None:
    """Fail at start, naming the URL, when an HTTP(S) shard cannot be fetched (server down, wrong
    host, 404, no permission)."""
    if not is_http(url):
        return
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"Range": "bytes=0-0"}), timeout=TIMEOUT_S
        ):
            pass
    except urllib.error.HTTPError as err:
        raise FileNotFoundError(
            f"{what}: {url} answers HTTP {err.code} ({err.reason}): check the URL pattern and "
            "that the shards are readable by this machine (a presigned URL may have expired)"
        ) from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(
            f"{what}: cannot reach {url} ({reason}): is the server up and the host right? Check "
            "with: curl -I " + url
        ) from err
