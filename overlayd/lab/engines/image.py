"""The busybox image the lab's engines import: a rootfs tarball made from
Debian's busybox-static, built once per machine boot under the lab's state
root and shared by every lab and engine.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from pathlib import Path

from overlayd.lab.engines.common import EngineError, run_command

BUSYBOX = Path("/usr/bin/busybox")  # Debian's busybox-static
# What the lab's containers run; the image build fails without them.
REQUIRED_APPLETS = ("sh", "httpd", "wget", "ping", "nc", "sleep", "timeout", "ip", "cat")


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    return run_command([str(busybox), "--list"]).split()


def build_busybox_tarball(target: Path, busybox: Path = BUSYBOX) -> Path:
    """A rootfs tarball: /bin/busybox, a link per applet, /etc/passwd and
    /etc/group for root, /tmp, and /www/index.html for httpd. Written to a
    temporary name and renamed, so concurrent builders never see half a file."""
    if target.exists():
        return target
    applets = busybox_applets(busybox)
    missing = [a for a in REQUIRED_APPLETS if a not in applets]
    if missing:
        raise EngineError(f"{busybox} lacks applets {missing}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tar.tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:

            def add_dir(name: str, mode: int = 0o755) -> None:
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)

            def add_text(name: str, text: str) -> None:
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, _BytesReader(data))

            for d in ("bin", "etc", "proc", "sys", "dev", "root", "www", "var"):
                add_dir(d)
            add_dir("tmp", 0o1777)
            tar.add(str(busybox), "bin/busybox")
            for applet in applets:
                if applet != "busybox":
                    link = tarfile.TarInfo(f"bin/{applet}")
                    link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                    tar.addfile(link)
            add_text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
            add_text("etc/group", "root:x:0:\n")
            add_text("www/index.html", "overlayd-busybox\n")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


class _BytesReader:
    """The file object tarfile.addfile reads a member's data from."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


def image_tarball(state_root: Path) -> Path:
    """The busybox rootfs, built once per machine boot under the lab's state
    root (a tmpfs), shared by every lab and engine."""
    return build_busybox_tarball(state_root / "images" / "overlayd-busybox.tar")
