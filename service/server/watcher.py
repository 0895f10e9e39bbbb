"""`--watch`: reload the model when its file changes (and the token file, always: service/server/auth.py).

Polling rather than inotify, because the ways models get deployed defeat inotify: a Kubernetes
ConfigMap or volume swaps a symlink, `os.replace` swaps the inode, network filesystems send no events.
A change is the followed file's (device, inode, size, mtime) differing from what was last loaded; it
must then stay the same for one more poll before the reload starts, so a file still being copied in
place is not loaded half-written. A file that is briefly missing (between unlink and rename) is waited
for. A reload that fails is not retried until the file changes again: the old model keeps serving.

`--model` may name a directory (KServe mounts a model's storage at /mnt/models): `model_file` finds the one
`.onnx` file in it, and the watcher follows whichever file that is at each poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from service.telemetry.logs import fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileState:
    """What identifies one version of a file without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int


def model_file(path: Path) -> Path:
    """The file `--model` means: `path` itself, or the one `.onnx` file directly inside a directory.

    Hidden files (a `.lenet5.onnx.tmp` being written before its rename) do not count. Raises ValueError
    naming the directory and what it holds when that is not exactly one.
    """
    if not path.is_dir():
        return path
    found = sorted(p.name for p in path.iterdir() if p.suffix == ".onnx" and not p.name.startswith(".")
                   and p.is_file())
    if len(found) == 1:
        return path / found[0]
    held = "none" if not found else f"{len(found)}: {', '.join(found)}"
    raise ValueError(f"--model {path} is a directory, which must hold exactly one .onnx file; it holds {held}")


def file_state(path: Path) -> FileState | None:
    """The state of `path` (symlinks followed), or None when it does not exist right now."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ModelFileWatcher:
    """Polls `path` every `interval_s` seconds and awaits `reload()` after a settled change.

    `resolve` maps `path` to the file to watch at each poll (`model_file` for a model directory); a
    ValueError from it counts as the file being missing for now. `what` names the file in log lines.
    """

    def __init__(self, path: Path, reload: Callable[[], Awaitable[object]], interval_s: float = 1.0, *,
                 resolve: Callable[[Path], Path] | None = None, what: str = "model file") -> None:
        if interval_s <= 0:
            raise ValueError("watch interval must be > 0 seconds")
        self._path = Path(path)
        self._reload = reload
        self._interval = interval_s
        self._resolve = resolve
        self._what = what
        self._task: asyncio.Task[None] | None = None

    def _state(self) -> FileState | None:
        try:
            target = self._resolve(self._path) if self._resolve is not None else self._path
        except ValueError:
            return None  # e.g. a model directory caught between two files: wait for it to settle
        return file_state(target)

    def start(self) -> None:
        """Start polling on the running event loop; the current file counts as already loaded."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(self._state()),
                                                                name=f"{self._what} watcher")
            log.info("watching %s for changes", self._what, extra=fields(path=str(self._path),
                                                                         interval_seconds=self._interval))

    async def stop(self) -> None:
        """Stop polling; a reload in progress is cancelled (the swap is atomic, so nothing half-done)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, loaded: FileState | None) -> None:
        candidate: FileState | None = None
        while True:
            await asyncio.sleep(self._interval)
            current = self._state()
            if current is None or current == loaded:
                candidate = None  # missing mid-replace, or back to what is loaded: nothing to do yet
                continue
            if current != candidate:
                candidate = current  # changed (or still changing): wait one more poll to see it settle
                continue
            loaded, candidate = current, None
            log.info("%s changed; reloading", self._what, extra=fields(path=str(self._path), size=current.size))
            try:
                await self._reload()
            except Exception:  # the watcher must outlive any reload failure; the old version keeps serving
                log.exception("reload after a change of the %s failed", self._what)
