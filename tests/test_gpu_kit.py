"""tools/gpu_kit.py: the parts that carry Keras and TensorFlow to a GPU machine without a
network. `pack` needs the package index (checked by hand: docs/compare.md, "Setting up a GPU
machine"); here, a small folder packed, checked and unpacked, and every refusal."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.backend_independent

TOOL = os.path.join(REPO, "tools", "gpu_kit.py")
spec = importlib.util.spec_from_file_location("gpu_kit", TOOL)
gpu_kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_kit)


def small_site(path):
    (path / "pkg").mkdir(parents=True)
    (path / "pkg" / "__init__.py").write_text("ANSWER = 42\n")
    (path / "pkg" / "data.bin").write_bytes(os.urandom(5000))  # incompressible: 2+ parts
    return path


def unpack(kit, site):
    return subprocess.run([sys.executable, TOOL, "unpack", "--dir", str(kit), "--site",
                           str(site)], capture_output=True, text=True, timeout=60)


def test_parts_unpack_to_the_same_folder(tmp_path):
    site = small_site(tmp_path / "site")
    kit = tmp_path / "kit"
    parts = gpu_kit.pack_folder(str(site), str(kit), part_bytes=2048)
    assert len(parts) >= 3 and all(os.path.getsize(kit / p) <= 2048 for p in parts)
    assert sorted(os.listdir(kit)) == sorted(parts + ["MANIFEST"])
    done = unpack(kit, tmp_path / "there")
    assert done.returncode == 0, done.stderr
    for name in ("__init__.py", "data.bin"):
        assert (tmp_path / "there" / "pkg" / name).read_bytes() == (site / "pkg" / name).read_bytes()
    assert unpack(kit, tmp_path / "there").returncode == 0  # its own folder: replaced
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = unpack(kit, elsewhere)  # someone else's folder: kept
    assert done.returncode == 2 and "was not made by unpack" in done.stderr
    # packed again with larger parts: the old parts go
    assert gpu_kit.pack_folder(str(site), str(kit), part_bytes=2**20) == ["part-01"]
    assert sorted(os.listdir(kit)) == ["MANIFEST", "part-01"]


def test_a_missing_or_damaged_part_is_named_in_one_line(tmp_path):
    kit = tmp_path / "kit"
    parts = gpu_kit.pack_folder(str(small_site(tmp_path / "site")), str(kit), part_bytes=2048)
    there = tmp_path / "there"
    (kit / parts[1]).rename(tmp_path / "aside")
    done = unpack(kit, there)
    assert done.returncode == 2 and done.stderr.startswith(f"error: missing {parts[1]} in ")
    assert len(done.stderr.strip().splitlines()) == 1 and not there.exists()
    (tmp_path / "aside").rename(kit / parts[1])
    with open(kit / parts[0], "r+b") as f:
        f.write(b"x")
    done = unpack(kit, there)
    assert done.returncode == 2 and f"{parts[0]} in " in done.stderr
    assert "differ from the MANIFEST" in done.stderr and not there.exists()
    (kit / "MANIFEST").write_text("not a manifest line\n")
    done = unpack(kit, there)
    assert done.returncode == 2 and "is not a kit's MANIFEST" in done.stderr
    # Parts that match their MANIFEST but are no xz tar, or hold no site/: one line each
    import hashlib

    for content in (b"not xz at all", None):
        if content is None:  # an xz tar of something else
            import io
            import tarfile

            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
                info = tarfile.TarInfo("other.txt")
                tar.addfile(info, io.BytesIO(b""))
            content = buffer.getvalue()
        (kit / "part-01").write_bytes(content)
        (kit / "MANIFEST").write_text(f"{hashlib.sha256(content).hexdigest()} part-01\n")
        done = unpack(kit, there)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "not a kit `pack` wrote" in done.stderr and not there.exists()
    (kit / "MANIFEST").unlink()
    done = unpack(kit, there)
    assert done.returncode == 2 and "no " in done.stderr and "gpu_kit.py pack" in done.stderr


def test_part_size_out_of_range_is_refused():
    for size in ("0", "64"):
        done = subprocess.run([sys.executable, TOOL, "pack", "--part-mb", size],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stderr.strip() == (f"error: --part-mb {size}: give 1 to 63 (the device "
                                       "tool carries 64 MiB per call, the repository included)")
