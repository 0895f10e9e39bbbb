"""`digits download`: fetch the four canonical MNIST files from a mirror, verified by sha256.

This is the only code that touches the network, and only when asked to. It fails fast (short timeout)
and tells the user how to continue offline.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from training.data import file_sha256

# sha256 of the original gzip files as published by Yann LeCun and mirrored unchanged.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaaee9a2b8b3c6d6d1",
}

# The mirrors torchvision uses (the original yann.lecun.com site now refuses anonymous downloads).
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MIRROR_ENV = "DIGITS_MNIST_MIRROR"
"""Comma-separated mirror base URLs that replace the defaults (for a local mirror, and for tests)."""
DEFAULT_TIMEOUT_S = 10.0


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected content."""


def mirrors_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The mirror list: $DIGITS_MNIST_MIRROR when set, else the defaults."""
    configured = [m.strip() for m in environ.get(MIRROR_ENV, "").split(",") if m.strip()]
    return tuple(configured) or DEFAULT_MIRRORS


def _fetch(url: str, target: Path, timeout: float) -> str:
    """Stream `url` into `target`, returning the sha256 of what arrived."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as handle:
        for block in iter(lambda: response.read(1 << 16), b""):
            digest.update(block)
            handle.write(block)
    return digest.hexdigest()


def download_mnist(
    data_dir: str | Path,
    mirrors: Sequence[str] | None = None,
    *,
    expected: Mapping[str, str] = MNIST_SHA256,
    timeout: float = DEFAULT_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Download every file of `expected` into `data_dir` unless already there with the right sha256.

    Each file is tried on each mirror in turn; a file is only moved into place after its sha256
    matched, so an interrupted or tampered download never leaves a usable-looking file behind.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    mirrors = tuple(mirrors) if mirrors else mirrors_from_env()
    written = []
    for name, sha256 in expected.items():
        target = data_dir / name
        if target.is_file() and file_sha256(target) == sha256:
            log(f"{target}: already present, sha256 verified")
            written.append(target)
            continue
        problems = []
        partial = target.with_name(target.name + ".part")
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                got = _fetch(url, partial, timeout)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                problems.append(f"{url}: {reason}")
                continue
            if got != sha256:
                problems.append(f"{url}: sha256 mismatch (expected {sha256}, got {got})")
                continue
            partial.replace(target)
            log(f"{target}: downloaded from {mirror}, sha256 verified")
            written.append(target)
            break
        else:
            partial.unlink(missing_ok=True)
            raise DownloadError(
                f"could not download {name}: " + "; ".join(problems) + ". If this machine is offline, "
                "copy the MNIST IDX files (train-*/t10k-*-ubyte[.gz]) into a directory and pass it with "
                "--data-dir."
            )
    return written
