"""MovieLens by name (download once, checksum-verified) and MovieLens layouts on disk (zip or folder).

Layouts, recognised by their ratings file: `ratings.csv` (latest, 20M, 25M, 32M; header), `ratings.dat`
(1M; `::`, no header) and `u.data` (100K; tab, no header). All three go through the generic reader
(headerless four-column files are read as user, item, rating, timestamp); titles come from
`movies.csv`, `movies.dat` (latin-1, `::`) or `u.item` (latin-1, `|`).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pandas as pd

from mfpipe.config import DataOptions
from mfpipe.data.files import CORRUPT, TableSource, file_source, read_table
from mfpipe.errors import MfpipeError, TransientError

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
#: Published MD5s (../shared/data/CHECKSUMS.md); for `latest` this is the edition used when the sidecar is unreadable.
PINNED_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-latest-small": "10f4e6a2c173056b1226d535259b23cf",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
    "ml-32m": "d472be332d4daa821edc399621853b57",
}
REISSUED = frozenset({"ml-latest-small"})  # re-issued over time: trust the published sidecar first
#: ratings file -> titles file; the order is the detection order
LAYOUTS = {"ratings.csv": "movies.csv", "ratings.dat": "movies.dat", "u.data": "u.item"}
SIDECAR = re.compile(r"MD5\s*\((?P<name>[^)]+)\)\s*=\s*(?P<md5>[0-9a-fA-F]{32})")
SIDECAR_TIMEOUT_S = 10


# -- download ------------------------------------------------------------------------------------
def sidecar_md5(name: str, base_url: str) -> str | None:
    """The MD5 published beside `<name>.zip` (`MD5 (<name>.zip) = <hex>`), or None if unreadable."""
    import requests

    try:
        response = requests.get(f"{base_url}{name}.zip.md5", timeout=SIDECAR_TIMEOUT_S)
        response.raise_for_status()
    except requests.RequestException:
        return None
    match = SIDECAR.search(response.text)
    return match["md5"].lower() if match and match["name"].strip() == f"{name}.zip" else None


def expected_md5(name: str, base_url: str) -> str:
    """Pinned for fixed releases; the sidecar for re-issued ones, falling back to the pinned edition."""
    if name in REISSUED:
        return sidecar_md5(name, base_url) or PINNED_MD5[name]
    return PINNED_MD5[name]


def _placed(target: Path, md5: str) -> str:
    """Why a file already at `target` was not used (pooch downloads again over one whose MD5 differs)."""
    import pooch

    if not target.is_file():
        return ""
    found = pooch.file_hash(str(target), alg="md5")
    return f"; the file already at {target} has MD5 {found}, not {md5} (another edition or a damaged copy)"


def fetch(name: str, data_home: Path, base_url: str = BASE_URL) -> Path:
    """Download `<name>.zip` once into `data_home`, verify its MD5, extract; returns the extracted folder.

    A zip placed at `data_home/<name>.zip` by hand with the expected MD5 is used offline as is. pooch's
    INFO lines are silenced: they go to stderr, where a failure must be a single line (the progress bar
    still shows a download).
    """
    import pooch
    import requests

    base_url = base_url if base_url.endswith("/") else base_url + "/"
    url = f"{base_url}{name}.zip"
    target = Path(data_home) / f"{name}.zip"
    by_hand = f"place {name}.zip by hand at {target}, or pass --data PATH to a local copy (the zip or its folder)"
    md5 = expected_md5(name, base_url)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        Path(data_home).mkdir(parents=True, exist_ok=True)
        pooch.retrieve(
            url,
            known_hash=f"md5:{md5}",
            fname=target.name,
            path=data_home,
            processor=pooch.Unzip(extract_dir=name),
            progressbar=True,
        )
    except ValueError as exc:  # pooch: a hash mismatch, or a URL it cannot download from
        if "hash" not in str(exc):
            raise MfpipeError(f"{url}: cannot download ({exc}){_placed(target, md5)}; {by_hand}") from None
        raise MfpipeError(
            f"{url}: checksum mismatch (expected MD5 {md5}); the download was discarded; {by_hand}"
        ) from None
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise MfpipeError(f"{url}: download failed (HTTP {status}){_placed(target, md5)}; {by_hand}") from None
    except requests.RequestException as exc:  # no network, a server away: worth another try
        detail = f"{type(exc).__name__}: offline?"
        raise TransientError(f"{url}: download failed ({detail}){_placed(target, md5)}; {by_hand}", 2) from None
    except OSError as exc:
        raise MfpipeError(f"{target}: cannot store the download ({exc.strerror or exc}); {by_hand}") from None
    finally:
        logger.setLevel(level)
    return Path(data_home) / name


# -- layouts -------------------------------------------------------------------------------------
def find_ratings(folder: Path) -> Path | None:
    """The ratings file of a MovieLens folder: in the folder itself or in its only subfolder."""
    for ratings in LAYOUTS:
        if (folder / ratings).is_file():
            return folder / ratings
    subfolders = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if len(subfolders) == 1:
        return find_ratings(subfolders[0])
    return None


def _zip_ratings(names: list[str]) -> str | None:
    """The ratings member of a MovieLens zip (the shallowest one of the first layout found)."""
    for ratings in LAYOUTS:
        found = sorted((n for n in names if n == ratings or n.endswith("/" + ratings)), key=lambda n: n.count("/"))
        if found:
            return found[0]
    return None


def _member_opener(archive: Path, member: str) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        return zipfile.Path(archive, member).open("rb")

    return open_member


def is_movielens_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return _zip_ratings(zf.namelist()) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def read_zip(path: Path, options: DataOptions) -> pd.DataFrame:
    """A MovieLens zip read in place (members are streamed, nothing is extracted)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        raise MfpipeError(f"{path}: not a valid zip archive") from None
    except PermissionError:
        raise MfpipeError(f"{path}: permission denied (cannot read the file)") from None
    member = _zip_ratings(names)
    if member is None:
        raise MfpipeError(f"{path}: zip archive without a MovieLens ratings file ({', '.join(LAYOUTS)})")
    frame = read_table(TableSource(f"{path}:{member}", _member_opener(path, member)), options)
    folder, _, ratings_name = member.rpartition("/")
    titles_member = f"{folder}/{LAYOUTS[ratings_name]}" if folder else LAYOUTS[ratings_name]
    if titles_member in names:
        titles = read_titles(f"{path}:{titles_member}", LAYOUTS[ratings_name], _member_opener(path, titles_member))
        frame.attrs["titles"] = titles
    frame.attrs["name"] = path.name.removesuffix(".zip")
    return frame


def read_folder(folder: Path, options: DataOptions) -> pd.DataFrame:
    """An extracted MovieLens folder (the one holding the ratings file, or its parent)."""
    ratings = find_ratings(folder)
    if ratings is None:
        raise MfpipeError(
            f"{folder}: is a directory but not a MovieLens layout (no {', '.join(LAYOUTS)} in it or its only "
            "subfolder); pass the interactions file itself"
        )
    frame = read_table(file_source(ratings), options)
    titles = ratings.parent / LAYOUTS[ratings.name]
    if titles.is_file():
        frame.attrs["titles"] = read_titles(str(titles), titles.name, lambda: titles.open("rb"))
    frame.attrs["name"] = ratings.parent.name
    return frame


def read_titles(label: str, kind: str, open_file: Callable[[], IO[bytes]]) -> dict[str, str]:
    """item id -> title from movies.csv (UTF-8), movies.dat (latin-1, `::`) or u.item (latin-1, `|`).

    Titles only decorate recommendations, so an odd titles file (empty, one column, ragged rows, another
    encoding) gives fewer titles rather than an error; only a file that cannot be read is one, naming `label`.
    """
    try:
        with open_file() as f:
            raw = f.read()
    except CORRUPT as exc:
        raise MfpipeError(f"{label}: cannot read the titles ({exc})") from None
    if kind == "movies.csv":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        rows = itertools.islice(csv.reader(io.StringIO(text)), 1, None)  # quoted titles may hold commas
    elif kind == "movies.dat":
        rows = (line.split("::", 2) for line in raw.decode("latin-1").splitlines() if line.strip())
    else:
        rows = csv.reader(raw.decode("latin-1").splitlines(), delimiter="|", quoting=csv.QUOTE_NONE)
    return {row[0]: row[1] for row in rows if len(row) >= 2}
