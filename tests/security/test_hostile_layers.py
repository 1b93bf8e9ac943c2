"""Hostile layer tars: each is refused or contained, and nothing outside the target changes.

Every escaping case is first shown to escape with Python's own ``tarfile.extractall`` and no
filter, so the inputs are real attacks and a passing test is not an accident.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest
from hostile_layers import Member, build_tar, cases, gzip_bomb, huge_pax_header

from sandbox.errors import ImageError
from sandbox.image.extract import extract_layer
from sandbox.image.oci import OCI_LAYER, Descriptor, digest_of
from sandbox.image.store import Store
from sandbox.image.tarstream import Budget

CASES = cases()


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path]:
    """(target, outside): the extraction target and a watched directory beside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("do not touch")
    target = tmp_path / "deep" / "er" / "still" / "target"
    target.mkdir(parents=True)
    return target, outside


@pytest.mark.parametrize("case", [c for c in CASES if c.escapes], ids=lambda c: c.name)
def test_the_attack_escapes_a_naive_extractor(case, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "deep" / "er" / "still" / "naive"
    target.mkdir(parents=True)
    data = build_tar(case.members, str(outside))
    # the control may stop half-way (OSError): whatever it wrote before that counts
    with tarfile.open(fileobj=io.BytesIO(data)) as tar, contextlib.suppress(OSError):
        tar.extractall(target, filter="fully_trusted")
    assert (outside / "pwned").exists(), "the control shows no escape: the case tests nothing"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_layer_is_refused_or_contained(case, arena):
    target, outside = arena
    before = snapshot(target.parent.parent.parent.parent)
    before = {k: v for k, v in before.items() if not k.startswith(str(target))}
    data = build_tar(case.members, str(outside))
    if case.refused:
        with pytest.raises(ImageError):
            extract_layer(io.BytesIO(data), str(target), Budget())
    else:
        extract_layer(io.BytesIO(data), str(target), Budget())
    after = snapshot(target.parent.parent.parent.parent)
    after = {k: v for k, v in after.items() if not k.startswith(str(target))}
    assert after == before, "something outside the target changed"
    assert (outside / "victim").read_text() == "do not touch"
    for dirpath, dirnames, filenames in os.walk(target):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert st.st_rdev == 0, f"{name}: a real device node was made"


def test_setuid_bits_are_dropped_and_opaque_dirs_marked(arena):
    target, _ = arena
    case = {c.name: c for c in CASES}
    extract_layer(io.BytesIO(build_tar(case["setuid-file"].members, "")), str(target), Budget())
    assert stat.S_IMODE(os.lstat(target / "suid").st_mode) == 0o755
    other = target.parent / "opaque"
    other.mkdir()
    extract_layer(io.BytesIO(build_tar(case["opaque-and-whiteout"].members, "")), str(other),
                  Budget())
    assert os.getxattr(other / "a", "user.overlay.opaque") == b"y"
    st = os.lstat(other / "a" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # an overlay whiteout
    assert (other / "a" / "kept").read_bytes() == b"k"


def test_a_gzip_bomb_is_refused_quickly(arena):
    target, _ = arena
    bomb = gzip_bomb(1 << 30)  # 1 GiB of zeros in about 1 MB
    assert len(bomb) < 2 << 20
    started = time.monotonic()
    with pytest.raises(ImageError, match="ratio"):
        extract_layer(io.BytesIO(bomb), str(target), Budget())
    assert time.monotonic() - started < 10
    written = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(target)
                  for f in fs)
    assert written < 128 << 20


def test_byte_and_entry_budgets(arena):
    target, _ = arena
    many = build_tar([Member(f"f{i}") for i in range(200)], "")
    with pytest.raises(ImageError, match="entries"):
        extract_layer(io.BytesIO(many), str(target), Budget(max_entries=100))
    big = build_tar([Member("big", data=b"x" * 100_000)], "")
    with pytest.raises(ImageError, match="bytes"):
        extract_layer(io.BytesIO(big), str(target.parent), Budget(max_bytes=50_000))


def test_an_oversized_pax_header_is_refused_before_it_is_read(arena):
    target, _ = arena
    with pytest.raises(ImageError, match="metadata budget"):
        extract_layer(io.BytesIO(huge_pax_header()), str(target), Budget())


def test_garbage_and_truncated_archives_are_refused(arena):
    target, _ = arena
    for data in (b"not a tar" * 100, build_tar([Member(
            "f", data=b"x" * 5000)], "")[:1500]):
        with pytest.raises(ImageError):
            extract_layer(io.BytesIO(data), str(target), Budget())


def test_the_store_refuses_a_blob_that_does_not_match_its_digest(tmp_path):
    store = Store(tmp_path / "store")
    good = build_tar([Member("f", data=b"good")], "")
    evil = build_tar([Member("f", data=b"evil")], "")
    with pytest.raises(ImageError, match="digest mismatch"):
        store.put_stream(io.BytesIO(evil), digest_of(good), len(evil))
    assert not store.has_blob(digest_of(good))
    with pytest.raises(ImageError, match="larger"):
        store.put_stream(io.BytesIO(good + b"extra"), digest_of(good), len(good))
    store.put_stream(io.BytesIO(good), digest_of(good), len(good))
    # a layer whose content does not hash to the config's diff id is not kept
    with pytest.raises(ImageError, match="diff id"):
        store.unpack(Descriptor(OCI_LAYER, digest_of(good), len(good)), digest_of(evil))
    assert not store.layer_path(digest_of(evil)).exists()
    assert list((store.root / "tmp").iterdir()) == []


def test_an_image_has_a_budget_for_all_its_layers_together(tmp_path, monkeypatch):
    from sandbox.image import store as store_module
    from sandbox.image.oci import OCI_CONFIG, canonical_json, manifest_json

    store = Store(tmp_path / "store")
    layers, diff_ids = [], []
    for i in range(3):
        tar = build_tar([Member(f"f{i}", data=bytes(3000))], "")
        store.put_bytes(tar)
        layers.append(Descriptor(OCI_LAYER, digest_of(tar), len(tar)))
        diff_ids.append(digest_of(tar))
    config = canonical_json({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    manifest = manifest_json(Descriptor(OCI_CONFIG, store.put_bytes(config), len(config)), layers)
    monkeypatch.setattr(store_module, "MAX_IMAGE_BYTES", 25_000)  # each tar is 10 KiB
    with pytest.raises(ImageError, match="more than 4520 bytes"):  # the third layer's share
        store.add_image(manifest)
    monkeypatch.setattr(store_module, "MAX_IMAGE_BYTES", 31_000)
    assert len(store.add_image(manifest).manifest.layers) == 3


def test_the_store_is_private_whatever_the_umask_and_refuses_one_that_is_not(tmp_path):
    from sandbox.errors import HostError

    old = os.umask(0)
    try:
        (tmp_path / "control").mkdir()  # control: what a plain mkdir gives under this umask
        assert stat.S_IMODE((tmp_path / "control").stat().st_mode) == 0o777
        store = Store(tmp_path / "store")
        digest = store.put_bytes(b"secret")
    finally:
        os.umask(old)
    for sub in ("", "blobs", "blobs/sha256", "layers", "cache", "tmp"):
        assert stat.S_IMODE((store.root / sub).stat().st_mode) == 0o700, sub
    assert stat.S_IMODE(store.blob_path(digest).stat().st_mode) == 0o600
    os.chmod(store.root, 0o711)
    with pytest.raises(HostError, match="open to other users"):
        Store(tmp_path / "store")
    os.chmod(store.root, 0o700)
    os.chmod(store.root / "layers", 0o777)  # a layout dir of ours is put right
    Store(tmp_path / "store")
    assert stat.S_IMODE((store.root / "layers").stat().st_mode) == 0o700
    os.chown(store.root, 65534, 65534)
    with pytest.raises(HostError, match="owned by uid 65534"):
        Store(tmp_path / "store")
