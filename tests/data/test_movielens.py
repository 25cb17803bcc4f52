"""MovieLens: download once (local HTTP server), checksum and offline errors, zips and folders by path."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mfpipe.config import DataOptions
from mfpipe.data import movielens, read_frame
from mfpipe.errors import MfpipeError
from tests.conftest import require

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ZIP = SHARED / "ml-latest-small.zip"
ROWS = 100_836


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def mirror(tmp_path):
    """A local GroupLens stand-in serving a copy of the shared zip and a generated .md5 sidecar."""
    require(ZIP.is_file(), f"{ZIP} not present")
    root = tmp_path / "mirror"
    root.mkdir()
    shutil.copy(ZIP, root / ZIP.name)
    md5 = hashlib.md5((root / ZIP.name).read_bytes()).hexdigest()
    (root / f"{ZIP.name}.md5").write_text(f"MD5 ({ZIP.name}) = {md5}\n")
    handler = type("Handler", (_Handler,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", handler.requests
    server.shutdown()
    server.server_close()


def test_download_once_verify_extract_and_parse(mirror, tmp_path):
    _, url, requests = mirror
    home = tmp_path / "home"
    frame = read_frame("ml-latest-small", DataOptions(movielens_url=url), home)
    assert len(frame) == ROWS and frame.attrs["name"] == "ml-latest-small"
    assert frame.attrs["titles"]["1"] == "Toy Story (1995)"
    assert (home / "ml-latest-small.zip").is_file() and (home / "ml-latest-small").is_dir()
    again = read_frame("ml-latest-small", DataOptions(movielens_url=url), home)
    assert len(again) == ROWS
    assert requests.count("/ml-latest-small.zip") == 1  # cached: downloaded once
    assert requests.count("/ml-latest-small.zip.md5") == 2  # the re-issued dataset re-reads its sidecar


def test_checksum_mismatch_names_the_file_and_the_fix(mirror, tmp_path):
    root, url, _ = mirror
    (root / f"{ZIP.name}.md5").write_text(f"MD5 ({ZIP.name}) = {'0' * 32}\n")
    home = tmp_path / "home"
    with pytest.raises(MfpipeError) as info:
        read_frame("ml-latest-small", DataOptions(movielens_url=url), home)
    message = str(info.value)
    assert f"{url}ml-latest-small.zip: checksum mismatch" in message
    assert str(home / "ml-latest-small.zip") in message and "--data PATH" in message
    assert not (home / "ml-latest-small.zip").exists()


def test_unreadable_sidecar_falls_back_to_the_pinned_edition(mirror, tmp_path):
    root, url, _ = mirror
    (root / f"{ZIP.name}.md5").unlink()
    assert movielens.sidecar_md5("ml-latest-small", url) is None
    frame = read_frame("ml-latest-small", DataOptions(movielens_url=url), tmp_path / "home")
    assert len(frame) == ROWS


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_names_the_file_and_how_to_place_it(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(MfpipeError) as info:
        read_frame("ml-100k", DataOptions(movielens_url=f"http://127.0.0.1:{_closed_port()}/"), home)
    message = str(info.value)
    assert "ml-100k.zip: download failed" in message
    assert f"place ml-100k.zip by hand at {home / 'ml-100k.zip'}" in message and "--data PATH" in message


def test_sidecar_format():
    assert movielens.SIDECAR.search("MD5 (ml-latest-small.zip) = 10F4E6A2C173056B1226D535259B23CF")["md5"]


def test_local_zip_and_extracted_folder_by_path(tmp_path):
    require(ZIP.is_file(), f"{ZIP} not present")
    from_zip = read_frame(str(ZIP), DataOptions(), tmp_path)
    from_folder = read_frame(str(SHARED / "ml-latest-small"), DataOptions(), tmp_path)
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "ml-latest-small").symlink_to(SHARED / "ml-latest-small")
    from_parent = read_frame(str(tmp_path / "parent"), DataOptions(), tmp_path)
    for frame in (from_zip, from_folder, from_parent):
        assert len(frame) == ROWS and frame.attrs["name"] == "ml-latest-small"
        assert len(frame.attrs["titles"]) == 9742
    assert from_zip["item_id"].equals(from_folder["item_id"])
    assert list(tmp_path.iterdir()) == [tmp_path / "parent"]  # nothing extracted


LAYOUTS = {
    "ml-100k": {
        "ml-100k/u.data": "196\t242\t3\t881250949\n186\t302\t3\t891717742\n",
        "ml-100k/u.item": "242|Kolya (1996)|24-Jan-1997||http://x|0|0\n302|L.A. Confidential (1997)|01-Jan-1997||x|0\n",
    },
    "ml-1m": {
        "ml-1m/ratings.dat": "1::1193::5::978300760\n2::661::3::978302109\n",
        "ml-1m/movies.dat": "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Caf\xe9: Paris (1996)::Anim\n",
    },
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_older_layouts_in_zip_and_folder(tmp_path, name):
    """Tiny hand-written files in the 100K (tab, u.item) and 1M (`::`, latin-1 movies.dat) layouts."""
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for member, text in LAYOUTS[name].items():
            zf.writestr(member, text.encode("latin-1"))
            (tmp_path / member).parent.mkdir(exist_ok=True)
            (tmp_path / member).write_bytes(text.encode("latin-1"))
    for spec in (archive, tmp_path / name):
        frame = read_frame(str(spec), DataOptions(), tmp_path)
        assert frame.attrs["name"] == name and len(frame) == 2
        assert frame["rating"].tolist()[0] in (3.0, 5.0) and frame["timestamp"].notna().all()
    titles = frame.attrs["titles"]
    assert titles.get("242") == "Kolya (1996)" or titles.get("661") == "Café: Paris (1996)"


def test_missing_archive_on_the_server_is_reported_with_its_status(mirror, tmp_path):
    _, url, _ = mirror
    with pytest.raises(MfpipeError, match=r"ml-1m\.zip: download failed \(HTTP 404\); place ml-1m\.zip by hand"):
        read_frame("ml-1m", DataOptions(movielens_url=url), tmp_path / "home")


def test_a_zip_placed_by_hand_is_used_offline(tmp_path, capfd):
    """The fix the offline message suggests works: the copy is checked against the pinned MD5, extracted."""
    require(ZIP.is_file(), f"{ZIP} not present")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ZIP, home / ZIP.name)
    offline = f"http://127.0.0.1:{_closed_port()}/"
    frame = read_frame("ml-latest-small", DataOptions(movielens_url=offline), home)
    assert len(frame) == ROWS and (home / "ml-latest-small").is_dir()
    assert capfd.readouterr().err == ""  # pooch's INFO lines are silenced


def test_offline_with_a_wrong_file_in_place_says_what_is_wrong_with_it(tmp_path, capfd):
    home = tmp_path / "home"
    home.mkdir()
    (home / "ml-100k.zip").write_bytes(b"not the archive")
    with pytest.raises(MfpipeError) as info:
        read_frame("ml-100k", DataOptions(movielens_url=f"http://127.0.0.1:{_closed_port()}/"), home)
    message = str(info.value)
    found = hashlib.md5(b"not the archive").hexdigest()
    assert (
        f"the file already at {home / 'ml-100k.zip'} has MD5 {found}, not {movielens.PINNED_MD5['ml-100k']}" in message
    )
    assert f"place ml-100k.zip by hand at {home / 'ml-100k.zip'}" in message and "\n" not in message
    assert capfd.readouterr().err == ""


def test_a_url_pooch_cannot_download_from_is_a_clear_error(tmp_path):
    with pytest.raises(
        MfpipeError, match=r"^nope://mirror/ml-1m\.zip: cannot download \(.*\); place ml-1m\.zip by hand"
    ):
        read_frame("ml-1m", DataOptions(movielens_url="nope://mirror"), tmp_path / "home")


@pytest.mark.parametrize(
    ("movies", "titles"),
    [
        (
            b'movieId,title,genres\n1,"Heat, The (1995)",Drama,extra\n2,Jumanji (1995)\n',
            {"1": "Heat, The (1995)", "2": "Jumanji (1995)"},
        ),
        (b"movieId\n1\n", {}),
        (b"", {}),
        (b"movieId,title\n1,Caf\xe9 (1995)\n", {"1": "Café (1995)"}),  # latin-1, not UTF-8
    ],
    ids=["ragged rows", "one column", "empty", "latin-1"],
)
def test_odd_titles_files_give_fewer_titles_not_an_error(tmp_path, movies, titles):
    """Titles only decorate: ragged rows keep their first two fields (pandas would shift them into an index)."""
    archive = tmp_path / "ml.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4,1300000000\n")
        zf.writestr("ml/movies.csv", movies)
    frame = read_frame(str(archive), DataOptions(), tmp_path)
    assert frame.attrs["titles"] == titles
