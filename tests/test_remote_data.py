"""Remote data roots: convert from a real HTTP server on localhost equals convert from disk.

The tree is the real-geometry fixture (:mod:`tools.realgeom`: odd EM-s0 phases, 1.74 nm z,
a crop nested in another, an 8 nm crop skipped at 4 nm), served by Python's
``http.server`` in a thread: once with folder listings (convert lists it like a bucket),
once without (plain HTTP: crops come from a crop manifest). ``--cache-to`` copies what
convert reads; an offline convert of that copy equals the remote convert, byte for byte.
"""

from __future__ import annotations

import csv
import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import PipelineError
from common.store import RemotePath, configure
from common.workdir import WorkDir
from stages.convert.cache import cache_tree
from stages.convert.convert import convert_options, find_crops, open_data_root, run_convert
from stages.convert.crops import Settings, StorageFailure
from tools.realgeom import RealGeomInfo, make_realgeom_tree

# hela-2 (odd phase), ctl 1.74 nm z, cos7 nested pair, liver (8 nm EM: skipped at 4 nm)
CROPS = ["1", "116", "238", "240", "183"]


class _Quiet(SimpleHTTPRequestHandler):
    requests: list[str] = []  # paths asked for (GET), shared by the test servers

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


def _is_chunk(path: str) -> bool:
    return not path.rstrip("/").rsplit("/", 1)[-1].startswith(".") and not path.endswith("/")


class _Flaky(_Quiet):
    """Answers 503 to the first request for every chunk: transient errors convert must retry."""

    seen: set[str] = set()

    def do_GET(self) -> None:
        if _is_chunk(self.path) and self.path not in _Flaky.seen:
            _Flaky.seen.add(self.path)
            self.send_error(503, "try again")
            return
        super().do_GET()


class _NoListing(_Quiet):
    """A plain static server: folders are not listable (404), like most HTTP data hosts."""

    def list_directory(self, path: str):  # type: ignore[override]
        self.send_error(404, "no listing")
        return None


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> RealGeomInfo:
    return make_realgeom_tree(tmp_path_factory.mktemp("remote") / "data", CROPS)


def _serve(root: Path, handler: type[SimpleHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        configure(chunk_cache="")


@pytest.fixture
def listing_url(tree: RealGeomInfo) -> Iterator[str]:
    yield from _serve(tree.root, _Quiet)


@pytest.fixture
def plain_url(tree: RealGeomInfo) -> Iterator[str]:
    yield from _serve(tree.root, _NoListing)


@pytest.fixture
def flaky_url(tree: RealGeomInfo) -> Iterator[str]:
    _Flaky.seen.clear()
    yield from _serve(tree.root, _Flaky)


def _manifest(info: RealGeomInfo, path: Path) -> Path:
    """The challenge's manifest format (``crop_name,dataset,class_label,...``) for the fixture's crops."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["crop_name", "dataset", "class_label", "voxel_size", "translation", "shape"])
        for c in info.crops.values():
            for cls in c.classes:
                w.writerow([c.crop, c.dataset, cls, "", "", ""])
    return path


def _convert(tmp: Path, name: str, data_root: str, **keys: object) -> tuple[WorkDir, list[dict]]:
    wd = WorkDir.at(tmp / name).ensure()
    cfg = load_config(wd.root, None, {"data_root": data_root, "resolution_nm": 4, **keys})
    summary = run_convert(cfg, wd, workers=1, progress=False)
    return wd, summary.records


def _assert_same_outputs(a: WorkDir, ra: list[dict], b: WorkDir, rb: list[dict]) -> None:
    """Same crops, same statuses, identical NIfTI bytes and datalist."""
    assert [(r["case"], r["status"]) for r in ra] == [(r["case"], r["status"]) for r in rb]
    done = [r for r in ra if r["status"] == "converted"]
    assert len(done) == 3  # at 4 nm 183 (8 nm EM) and 238 (8 nm labels) are skipped
    for r in done:
        for key in ("image", "label"):
            assert (a.nifti_dir / r[key]).read_bytes() == (b.nifti_dir / r[key]).read_bytes(), r[key]
    assert a.datalist.read_bytes() == b.datalist.read_bytes()
    assert json.loads(a.datalist.read_text())["training"]


def test_convert_from_http_equals_convert_from_disk(tree: RealGeomInfo, listing_url: str, tmp_path: Path) -> None:
    local, rl = _convert(tmp_path, "local", str(tree.root))
    remote, rr = _convert(tmp_path, "http", listing_url + "/")
    _assert_same_outputs(local, rl, remote, rr)
    assert any(r["status"] == "skipped" for r in rr)  # the 8 nm crop, same reason as locally
    # rerun: every record reused from its digest, no chunk fetched again
    _, again = _convert(tmp_path, "http", listing_url)
    assert [r["inputs_digest"] for r in again if r["status"] == "converted"] == [
        r["inputs_digest"] for r in rr if r["status"] == "converted"
    ]


def test_plain_http_needs_a_manifest_and_then_equals_disk(tree: RealGeomInfo, plain_url: str, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="crop_manifest"):
        _convert(tmp_path, "nolist", plain_url)
    manifest = _manifest(tree, tmp_path / "train_crop_manifest.csv")
    local, rl = _convert(tmp_path, "local", str(tree.root))
    remote, rr = _convert(tmp_path, "manifest", plain_url, convert={"crop_manifest": str(manifest)})
    _assert_same_outputs(local, rl, remote, rr)
    # --plan over plain HTTP (manifest, chunk presence by ranged reads) plans what the disk plans
    from stages.convert.convert import plan_convert

    plans = [
        plan_convert(
            load_config(
                tmp_path / "local",
                None,
                {"data_root": root, "resolution_nm": 4, "convert": {"crop_manifest": str(manifest)}},
                dump=False,
            )
        )
        for root in (str(tree.root), plain_url)
    ]
    assert plans[0] == plans[1] and {r["status"] for r in plans[0]} == {"convert", "skipped"}


def test_cache_then_offline_convert_equals_remote_convert(tree: RealGeomInfo, plain_url: str, tmp_path: Path) -> None:
    manifest = _manifest(tree, tmp_path / "m.csv")
    wd = WorkDir.at(tmp_path / "remote").ensure()
    cfg = load_config(
        wd.root, None, {"data_root": plain_url, "resolution_nm": 4, "convert": {"crop_manifest": str(manifest)}}
    )
    opts = convert_options(cfg)
    refs = find_crops(open_data_root(cfg, opts), cfg, opts)
    st = Settings(cfg.resolution_zyx, tuple(cfg.classes), cfg.unknown_label, 1, "")
    cache = tmp_path / "cache"
    first = cache_tree(cfg, cache, refs, st, progress=False)
    assert first.crops == 3 and first.files > 0 and first.reused == 0
    again = cache_tree(cfg, cache, refs, st, progress=False)  # resumable: nothing fetched twice
    assert again.files == 0 and again.reused >= first.files

    # exactly what convert reads: fewer EM chunks than the source holds, all of them under some cut
    def em_chunks(top: Path) -> set[Path]:
        return {
            p.relative_to(top)
            for p in top.rglob("*")
            if p.is_file() and "/fibsem-uint8/s0/" in str(p) and not p.name.startswith(".")
        }

    src_em, got_em = em_chunks(tree.root), em_chunks(cache)
    assert got_em and got_em < src_em, (len(got_em), len(src_em))
    remote, rr = _convert(tmp_path, "remote2", plain_url, convert={"crop_manifest": str(manifest)})
    offline, ro = _convert(tmp_path, "offline", str(cache))  # listed, no manifest, no network
    _assert_same_outputs(remote, rr, offline, ro)


def test_chunk_cache_keeps_fetched_chunks(tree: RealGeomInfo, listing_url: str, tmp_path: Path) -> None:
    chunks = tmp_path / "chunks"
    _, first = _convert(tmp_path, "a", listing_url, convert={"chunk_cache": str(chunks)})
    kept = [p for p in chunks.rglob("*") if p.is_file()]
    assert kept and all(not p.name.startswith(".z") for p in kept)
    local, rl = _convert(tmp_path, "local", str(tree.root))
    # second run from the cache (a fresh work dir: every crop converts again): no chunk fetched, equals disk
    _Quiet.requests.clear()
    cached, rc = _convert(tmp_path, "b", listing_url, convert={"chunk_cache": str(chunks)})
    assert _Quiet.requests and not [p for p in _Quiet.requests if _is_chunk(p)]
    _assert_same_outputs(local, rl, cached, rc)


def test_transient_errors_are_retried_never_read_as_fill(tree: RealGeomInfo, flaky_url: str, tmp_path: Path) -> None:
    local, rl = _convert(tmp_path, "local", str(tree.root))
    flaky, rf = _convert(tmp_path, "flaky", flaky_url, convert={"remote_retries": 2})
    _assert_same_outputs(local, rl, flaky, rf)
    _Flaky.seen.clear()  # every chunk fails once again; with no retry the stage stops (exit 1), nothing read as fill
    with pytest.raises(StorageFailure, match="remote read failed"):
        _convert(tmp_path, "noretry", flaky_url, convert={"remote_retries": 0})


def test_remote_path_resolves_inside_and_names() -> None:
    p = RemotePath("https://h.example/a/b.zarr") / "recon-1" / "x"
    assert p.name == "x" and str(p.parent) == "https://h.example/a/b.zarr/recon-1"
    assert str((p / ".." / ".." / "y").resolve()) == "https://h.example/a/b.zarr/y"


def test_cli_cache_to_then_offline_convert(tree: RealGeomInfo, plain_url: str, tmp_path: Path) -> None:
    """The documented commands: ``--cache-to`` on a login node, then ``--data-root <cache>`` offline."""
    from click.testing import CliRunner

    from stages.convert.__main__ import main

    manifest = _manifest(tree, tmp_path / "train_crop_manifest.csv")
    wd = tmp_path / "work"
    wd.mkdir()
    (wd / "pipeline.yaml").write_text(f"data_root: {plain_url}\nresolution_nm: 4\n")
    run = CliRunner().invoke(
        main, ["--work-dir", str(wd), "--crop-manifest", str(manifest), "--cache-to", str(tmp_path / "c")]
    )
    assert run.exit_code == 0, run.output
    assert "cache: 3 crops" in run.output and f"--data-root {tmp_path / 'c'}" in run.output
    run = CliRunner().invoke(main, ["--work-dir", str(wd), "--data-root", str(tmp_path / "c"), "--workers", "1"])
    assert run.exit_code == 0, run.output
    assert "convert: 3 converted (3 now), 2 skipped, 0 failed" in run.output
    local, rl = _convert(tmp_path, "local", str(tree.root))
    _assert_same_outputs(
        local,
        rl,
        WorkDir.at(wd),
        [json.loads(p.read_text()) for p in sorted((wd / "markers" / "convert").glob("*.json"))],
    )


def test_manifest_formats_and_bad_rows(tree: RealGeomInfo, tmp_path: Path) -> None:
    from stages.convert.crops import discover_crops

    long = discover_crops(tree.root, manifest=_manifest(tree, tmp_path / "m.csv"))
    compact = discover_crops(tree.root, crops=CROPS, manifest=Path("tests/data/real_crops.csv"))
    listed = discover_crops(tree.root)
    assert [(r.dataset, r.crop, r.zarr_root) for r in long] == [(r.dataset, r.crop, r.zarr_root) for r in listed]
    assert long == compact and all(r.arrays for r in long)
    bad = tmp_path / "bad.csv"
    bad.write_text("crop_name,dataset,class_label\n1,../../etc,mito\n")
    with pytest.raises(PipelineError, match=r"bad.csv:2: expected columns"):
        discover_crops(tree.root, manifest=bad)


def test_s3_roots_are_anonymous_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """s3:// through s3fs, anonymous without AWS variables; the no-s3fs fallback is the public HTTPS endpoint."""
    from common import store

    for v in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(v, raising=False)
    store.configure()
    p = RemotePath("s3://janelia-cosem-datasets/jrc_hela-2/jrc_hela-2.zarr")
    fs, key = p._fs_url()
    assert key == "janelia-cosem-datasets/jrc_hela-2/jrc_hela-2.zarr" and fs.anon is True
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    store.configure()
    assert store.filesystem("s3").anon is False
    assert store._s3_https(str(p)) == "https://janelia-cosem-datasets.s3.amazonaws.com/jrc_hela-2/jrc_hela-2.zarr"
    monkeypatch.setattr(store, "have_s3fs", lambda: False)
    fs, url = p._fs_url()
    assert url.startswith("https://janelia-cosem-datasets.s3.amazonaws.com/") and "http" in fs.protocol
    store.configure()
