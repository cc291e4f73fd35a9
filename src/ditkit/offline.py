"""Weights that cannot be fetched (a cluster without internet): one error that names the override
taking a local copy and the command that fetches it on a machine with internet.

Used for the Inception network (FID), VAEs and text encoders; any loader of hub or URL weights
(vision encoders, ...) wraps its download the same way::

    try:
        model = AutoModel.from_pretrained(name)
    except Exception as err:
        if is_network_error(err):
            raise WeightsUnavailableError(
                f"the encoder {name!r}", "encoder.pretrained=DIR", hub_download_hint(name)
            ) from err
        raise
"""

from __future__ import annotations

import socket
import urllib.error

# Exception types (by name, so no import is needed) that mean "the network is not reachable".
_OFFLINE_TYPES = (
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectError",
    "ConnectTimeout",
    "ProxyError",
)
_OFFLINE_TEXT = (
    "couldn't connect",
    "offline mode",
    "name or service not known",
    "temporary failure in name resolution",
    "network is unreachable",
    "connection refused",
    "max retries exceeded",
)


class WeightsUnavailableError(FileNotFoundError):
    """Weights that cannot be downloaded here. The message names what, the override that takes a
    local copy (pasteable as printed) and how to fetch it elsewhere."""

    def __init__(self, what: str, override: str, fetch: str, cause: BaseException | None = None):
        why = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
        super().__init__(
            f"cannot fetch {what}: the network is not reachable{why}. On a machine with internet, "
            f"{fetch}; copy it here and pass {override}"
        )
        self.override = override


def is_network_error(err: BaseException) -> bool:
    """Whether `err` (or anything in its cause / context chain) says the network is unreachable:
    DNS failures, refused connections, proxies, and the Hugging Face Hub's offline errors."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, urllib.error.URLError | socket.gaierror | socket.timeout):
            return True
        if isinstance(err, ConnectionError) or type(err).__name__ in _OFFLINE_TYPES:
            return True
        if any(text in str(err).lower() for text in _OFFLINE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def hub_download_hint(repo_id: str, subfolder: str | None = None, local_dir: bool = True) -> str:
    """How to fetch a Hugging Face Hub repo (``hf`` comes with huggingface_hub): into a folder of
    its own, or (local_dir=False) into the Hugging Face cache (~/.cache/huggingface)."""
    if not local_dir:
        return f"run `hf download {repo_id}` (it lands in the Hugging Face cache, ~/.cache/huggingface)"
    folder = repo_id.rsplit("/", 1)[-1]
    inner = f" (its {subfolder}/ is the part used)" if subfolder else ""
    return f"run `hf download {repo_id} --local-dir {folder}`{inner}"


def url_download_hint(url: str) -> str:
    return f"download {url} (e.g. `wget {url}`)"
