"""Expand inference inputs (files, folders, manifest CSVs, DICOMDIRs) into image paths.

:func:`find_inputs` returns ``(paths, problems)``:

* ``paths``: absolute, normalised paths (``os.path.abspath``; symlinks are kept, not
  resolved), each listed once, in input order; a folder's files are sorted by name, each
  folder's files before those of its sub-folders (depth first, sub-folders sorted).
* ``problems``: ``(path, reason)`` for inputs that cannot be used: missing inputs, manifests
  without an ``image`` column, unreadable files or folders (permission denied), broken or
  looping symlinks, DICOMDIR entries whose file is missing. Nothing is raised for these.

Rules
    * A **file** is listed as given (``read_image`` decides later whether it is an image),
      except a ``.csv`` file (a manifest) and a DICOMDIR (expanded, see below).
    * A **folder** is walked recursively. Hidden files and folders (name starting with ``.``)
      are skipped; symlinked folders are not followed (symlinked files are listed); a
      folder reached twice (a bind mount loop) is walked once. A file is listed when its
      suffix is an image suffix (``.png .jpg .jpeg .tif .tiff .dcm .dicom``), or, without a
      suffix, when its content is DICOM / PNG / JPEG / TIFF, or, with any other suffix, when
      its content is DICOM. Non-regular files (FIFOs, sockets, devices) are skipped.
    * A **manifest CSV** lists images in its ``image`` column, relative to the CSV's folder
      or absolute; the listed files are not checked here (``read_image`` reports a missing
      one). Empty ``image`` cells are problems.
    * A **DICOMDIR** (a file named ``DICOMDIR``, or any DICOM file of the Media Storage
      Directory SOP class) lists the files its directory records reference, relative to the
      DICOMDIR's folder, sorted. The DICOMDIR itself is not an image and is never listed.
      Inside a folder, a DICOMDIR's files are found by the walk as well; each is listed
      once (where the walk puts it); referenced files the walk did not find (in a hidden
      folder, say) come after everything found under that folder.
    * The **output folder** (``skip_folder``) is not walked when met inside an input folder,
      and is a problem when given as an input folder; files named inside it are listed.
"""
from __future__ import annotations

import csv
import errno
import os
import stat
from pathlib import Path

from data.readers import DICOM_SUFFIXES, image_suffixes, is_dicom, raster_magics
from data.tables import absolute_path

__all__ = ["find_inputs"]

_DICOMDIR_UID = b"1.2.840.10008.1.3.10"
_HEAD_BYTES = 512


def named_suffixes() -> set[str]:
    """Suffixes that mark a file as an input: the raster formats' and DICOM's."""
    return image_suffixes() | {s for s in DICOM_SUFFIXES if s}


def find_inputs(inputs: list[str], skip_folder: str | os.PathLike | None = None
                ) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files, folders, manifest CSVs and DICOMDIRs into image paths.

    ``skip_folder`` (an output folder) is not walked: met inside an input folder its subtree is
    left out, and given as an input folder itself it is a problem. Files named in it (directly,
    by a manifest or a DICOMDIR) are still listed. Returns ``(paths, problems)``; see the module
    docstring for the rules."""
    finder = _Finder(skip_folder)
    for item in inputs:
        finder.add_input(os.fspath(item))
    return list(dict.fromkeys(finder.paths)), list(dict.fromkeys(finder.problems))


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of ``path``, the same for every name of one folder; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ------------------------------------------------------------------------------------------
class _Finder:
    def __init__(self, skip_folder: str | os.PathLike | None = None) -> None:
        self.paths: list[str] = []
        self.problems: list[tuple[str, str]] = []
        self._walked: set[tuple[int, int]] = set()
        self._skipped = _identity(skip_folder) if skip_folder is not None else None

    def problem(self, path: str, reason: str) -> None:
        self.problems.append((str(path), " ".join(str(reason).split())))

    # ---------------------------------------------------------------------- top level
    def add_input(self, item: str) -> None:
        path = os.path.abspath(item)
        kind, err = _kind(path)
        if kind == "dir":
            if self._skipped is not None and _identity(path) == self._skipped:
                self.problem(item, "the output folder: its files are outputs, not inputs")
                return
            self.walk(path)
        elif kind == "file":
            if Path(path).suffix.lower() == ".csv":
                self.manifest(item, path)
                return
            head, err = _read_head(path)
            if err is not None:
                self.problem(item, err)
            elif _is_dicomdir(path, head):
                if self.dicomdir(path) == 0:
                    self.problem(item, "DICOMDIR lists no files")
            else:
                self.paths.append(path)
        elif kind == "missing":
            self.problem(item, "no such file or folder")
        else:
            self.problem(item, err)

    # ---------------------------------------------------------------------- folders
    def walk(self, top: str) -> None:
        try:
            st = os.stat(top)
        except OSError as e:
            self.problem(top, _os_reason(e, "cannot open the folder"))
            return
        key = (st.st_dev, st.st_ino)
        if key in self._walked:
            return  # already walked (as another input, or a loop through a bind mount)
        self._walked.add(key)
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.problem(top, _os_reason(e, "cannot list the folder"))
            return
        subdirs: list[str] = []
        dicomdirs: list[str] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.join(top, entry.name)
            kind, err = _entry_kind(entry)
            if kind == "dir":
                subdirs.append(path)
            elif kind == "file":
                self.folder_file(path, entry.name, dicomdirs)
            elif kind in ("link-dir", "special"):
                continue  # symlinked folders are not followed; FIFOs etc. are not images
            elif _looks_like_image_name(entry.name):  # broken / looping symlink, stat error
                self.problem(path, err)
        for sub in subdirs:
            if self._skipped is None or _identity(sub) != self._skipped:  # the output folder's files are not inputs
                self.walk(sub)
        for dicomdir in dicomdirs:  # after the walk: the walk's order wins for shared files
            self.dicomdir(dicomdir)

    def folder_file(self, path: str, name: str, dicomdirs: list[str]) -> None:
        suffix = Path(name).suffix.lower()
        head, err = _read_head(path)
        if err is not None:
            if suffix in named_suffixes() or suffix == "" or name.upper() == "DICOMDIR":
                self.problem(path, err)
            return
        if _is_dicomdir(path, head):
            dicomdirs.append(path)
        elif suffix in named_suffixes():
            self.paths.append(path)
        elif suffix == "" and head.startswith(raster_magics()):
            self.paths.append(path)
        elif _content_is_dicom(path, head):
            self.paths.append(path)

    # ---------------------------------------------------------------------- manifests
    def manifest(self, item: str, path: str) -> None:
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.reader(fh))
        except OSError as e:
            self.problem(item, _os_reason(e, "cannot read the manifest"))
            return
        except (UnicodeDecodeError, csv.Error) as e:
            self.problem(item, f"cannot parse the manifest: {type(e).__name__}: {e}")
            return
        header = [h.strip() for h in rows[0]] if rows else []
        if "image" not in header:
            self.problem(item, "manifest has no 'image' column")
            return
        col = header.index("image")
        folder = os.path.dirname(path)
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue  # blank line
            image = row[col].strip() if col < len(row) else ""
            if not image:
                self.problem(item, f"manifest line {line}: empty image path")
                continue
            self.paths.append(absolute_path(image, folder))

    # ---------------------------------------------------------------------- DICOMDIR
    def dicomdir(self, path: str) -> int | None:
        """List the files of a DICOMDIR; returns how many it references (None: unreadable)."""
        import pydicom

        try:
            ds = pydicom.dcmread(path, force=True)
            records = ds.get("DirectoryRecordSequence", None)
            if records is None:
                raise ValueError("no DirectoryRecordSequence")
            file_ids = []
            for record in records:
                file_id = record.get("ReferencedFileID", None)
                if file_id is None or file_id == "":
                    continue
                parts = [str(file_id)] if isinstance(file_id, (str, bytes)) else list(file_id)
                file_ids.append([str(p).strip() for p in parts if str(p).strip()])
        except Exception as e:
            self.problem(path, f"cannot read DICOMDIR: {type(e).__name__}: {e}")
            return None
        root = os.path.dirname(path)
        found: list[str] = []
        for parts in file_ids:
            if not parts or any(p in (".", "..") or "/" in p or "\\" in p or os.sep in p
                                for p in parts):
                self.problem(path, f"DICOMDIR entry {'/'.join(parts)!r} points outside its "
                                   "folder; ignored")
                continue
            target = _find_case_insensitive(root, parts)
            if target is None:
                self.problem(os.path.join(root, *parts), f"listed in DICOMDIR {path} but not "
                                                         "found")
                continue
            found.append(target)
        self.paths.extend(sorted(set(found), key=lambda p: Path(p).parts))
        return len(file_ids)


# ------------------------------------------------------------------------------------------
def _os_reason(e: OSError, what: str) -> str:
    if isinstance(e, PermissionError):
        return f"permission denied: {what}"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return f"{what}: {e.strerror or type(e).__name__}"


def _kind(path: str) -> tuple[str, str | None]:
    """("dir" | "file" | "special" | "missing" | "error", reason) following symlinks."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return "error", "broken symlink: its target does not exist"
        return "missing", None
    except OSError as e:
        return "error", _os_reason(e, "cannot open")
    if stat.S_ISDIR(st.st_mode):
        return "dir", None
    if stat.S_ISREG(st.st_mode):
        return "file", None
    return "special", "not a regular file (FIFO, socket or device)"


def _entry_kind(entry: os.DirEntry) -> tuple[str, str | None]:
    """Like _kind for a folder entry, with symlinked folders as "link-dir"."""
    try:
        if entry.is_symlink():
            kind, err = _kind(entry.path)
            return ("link-dir", None) if kind == "dir" else (kind, err)
        if entry.is_dir(follow_symlinks=False):
            return "dir", None
        if entry.is_file(follow_symlinks=False):
            return "file", None
        return "special", None
    except OSError as e:
        return "error", _os_reason(e, "cannot open")


def _read_head(path: str) -> tuple[bytes, str | None]:
    try:
        with open(path, "rb") as fh:
            return fh.read(_HEAD_BYTES), None
    except OSError as e:
        return b"", _os_reason(e, "cannot read the file")


def _looks_like_image_name(name: str) -> bool:
    suffix = Path(name).suffix.lower()
    return suffix in named_suffixes() or suffix == ""


def _is_dicomdir(path: str, head: bytes) -> bool:
    """Named DICOMDIR, or a Part 10 file whose MediaStorageSOPClassUID is the DICOMDIR one."""
    if os.path.basename(path).upper() == "DICOMDIR" and len(head) >= 132:
        return True
    if len(head) < 132 or head[128:132] != b"DICM":
        return False
    at = head.find(b"\x02\x00\x02\x00UI", 132)  # (0002,0002), explicit VR little endian
    if at < 0 or at + 8 > len(head):
        return False
    length = int.from_bytes(head[at + 6:at + 8], "little")
    return head[at + 8:at + 8 + length].rstrip(b"\x00 ") == _DICOMDIR_UID


def _content_is_dicom(path: str, head: bytes) -> bool:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if head[:2] not in (b"\x08\x00", b"\x00\x08"):
        return False
    return is_dicom(path)  # preamble-less: parse the header


def _find_case_insensitive(root: str, parts: list[str]) -> str | None:
    """``root/parts...`` if it is a file; else the same path matched case-insensitively
    (DICOMDIR file IDs are upper case; copies of CDs often are not)."""
    exact = os.path.join(root, *parts)
    if os.path.isfile(exact):
        return exact
    current = root
    for i, part in enumerate(parts):
        try:
            names = os.listdir(current)
        except OSError:
            return None
        match = next((n for n in sorted(names) if n.upper() == part.upper()), None)
        if match is None:
            return None
        current = os.path.join(current, match)
    return current if os.path.isfile(current) else None
