"""Carry what `make gpu-check` needs to a GPU machine that has no network.

The GPU machine lent to this project (docs/compare.md, "What we measured on a GPU") has
Python 3.12 with CUDA builds of jax and torch and most of kbench's dependencies, but not
Keras or TensorFlow (kbench's input pipeline is tf.data, on the CPU), and it cannot reach a
package index. Its device tool moves at most 64 MiB per call, and tensorflow-cpu alone is a
274 MB wheel. So, on a machine with pip and the network:

    python3 tools/gpu_kit.py pack [--dir .gpukit] [--part-mb 60]

installs the missing packages for that machine's Python and platform (pip's --target with
--python-version/--platform: nothing is built or run here) into one folder, drops
TensorFlow's C++ headers (nothing imports them), packs the folder as tar.xz and splits it
into parts under the per-call limit: .gpukit/part-01, part-02, ... and a MANIFEST with each
part's sha256. On the GPU machine, once every part is there (one call per part, each
carrying one, back to back while the machine stays warm):

    python3 tools/gpu_kit.py unpack [--dir .gpukit] [--site /tmp/kbench-site]
    export PYTHONPATH=/tmp/kbench-site:$PWD    # $PWD: the checkout, for recipes/*.py
    make gpu-check

`unpack` checks every part against the MANIFEST (a missing or damaged part is named in one
line, exit 2), then extracts. The packages and versions are PACKAGES below: Keras and
tensorflow-cpu as constraints.txt pins them, and the pure-Python packages those need that
the machine's image lacked or had too old (KINDS.md of the device tool lists the image).
Add `.gpukit/` to `.git/info/exclude` first: the parts travel as carried, ignored files.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# What the GPU image lacks for `kbench compare`: Keras and the tf.data pipeline's TensorFlow
# (CPU build: TF 2.21's CUDA build needs CUDA 12, the machine has 13), with their
# pure-Python needs the image does not have or has too old for TF 2.21 (protobuf >= 6.31,
# flatbuffers >= 25.9). Everything else (numpy, jax, torch, optax, rich, psutil, h5py,
# ml-dtypes, grpcio, wrapt, absl-py, scikit-learn, matplotlib) is the image's own.
PACKAGES = ("keras==3.15.1", "tensorflow-cpu==2.21.0", "namex", "optree", "astunparse",
            "gast", "google-pasta", "termcolor", "flatbuffers>=25.9.23", "protobuf>=6.31.1,<8")
DROPPED = ("tensorflow/include",)  # C++ headers: hundreds of MB, never imported
MANIFEST = "MANIFEST"
SITE_MARK = ".made-by-gpu-kit"  # in an unpacked folder: the only kind unpack replaces


class KitError(Exception):
    pass


def pack(kit_dir, part_mb, python=sys.executable):
    with tempfile.TemporaryDirectory() as tmp:
        site = os.path.join(tmp, "site")
        command = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                   "--only-binary=:all:", "--python-version", TARGET_PYTHON,
                   "--implementation", "cp", "--target", site,
                   *[f"--platform={p}" for p in PLATFORMS], *PACKAGES]
        print("[gpu-kit] " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
        for relative in DROPPED:
            shutil.rmtree(os.path.join(site, relative), ignore_errors=True)
        print("[gpu-kit] packing (xz, a few minutes)...", flush=True)
        parts = pack_folder(site, kit_dir, part_mb * 2**20)
    sizes = [os.path.getsize(os.path.join(kit_dir, p)) / 2**20 for p in parts]
    print(f"[gpu-kit] {len(parts)} parts in {kit_dir}: "
          + ", ".join(f"{p} {s:.0f} MiB" for p, s in zip(parts, sizes)))
    return parts


def pack_folder(site, kit_dir, part_bytes):
    """`site` as tar.xz, split into kit_dir/part-NN of part_bytes at most, and a MANIFEST of
    their sha256 (replacing an older kit's parts); returns the parts' names."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "site.tar.xz")
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            tar.add(site, arcname="site")
        os.makedirs(kit_dir, exist_ok=True)
        for old in os.listdir(kit_dir):
            if old.startswith("part-") or old == MANIFEST:
                os.remove(os.path.join(kit_dir, old))
        parts = _split(archive, kit_dir, part_bytes)
    lines = [f"{_sha256(os.path.join(kit_dir, p))}  {p}" for p in parts]
    _write_atomic(os.path.join(kit_dir, MANIFEST), "\n".join(lines) + "\n")
    return parts


def unpack(kit_dir, site):
    manifest = os.path.join(kit_dir, MANIFEST)
    if not os.path.isfile(manifest):
        raise KitError(f"no {manifest}: run `python3 tools/gpu_kit.py pack` where pip has a "
                       "network, and carry its MANIFEST with the first part")
    with open(manifest) as f:
        expected = [line.split() for line in f if line.strip()]
    if not expected or any(len(entry) != 2 for entry in expected):
        raise KitError(f"{manifest} is not a kit's MANIFEST (lines of: sha256 part-name): "
                       "carry the one `pack` wrote")
    missing = [name for _, name in expected
               if not os.path.isfile(os.path.join(kit_dir, name))]
    if missing:
        raise KitError(f"missing {', '.join(missing)} in {kit_dir}: carry each part in one "
                       "call to the same warm machine before unpacking")
    if os.path.exists(site) and not os.path.isfile(os.path.join(site, SITE_MARK)):
        raise KitError(f"--site {site} exists and was not made by unpack: give a new folder "
                       "(unpack replaces only its own)")
    damaged = [name for digest, name in expected
               if _sha256(os.path.join(kit_dir, name)) != digest]
    if damaged:
        raise KitError(f"{', '.join(damaged)} in {kit_dir} differ from the MANIFEST: carry "
                       "them again")
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "site.tar.xz")
        with open(archive, "wb") as out:
            for _, name in expected:
                with open(os.path.join(kit_dir, name), "rb") as part:
                    shutil.copyfileobj(part, out)
        try:
            with tarfile.open(archive, "r:xz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:  # lzma.LZMAError is an OSError
            raise KitError(f"the parts in {kit_dir} are not a kit `pack` wrote ({exc}); pack "
                           "it again") from None
        if not os.path.isdir(os.path.join(tmp, "site")):
            raise KitError(f"the parts in {kit_dir} hold no site/ folder: not a kit `pack` "
                           "wrote; pack it again")
        open(os.path.join(tmp, "site", SITE_MARK), "w").close()
        shutil.rmtree(site, ignore_errors=True)  # an earlier unpack's (checked above)
        shutil.move(os.path.join(tmp, "site"), site)
    # the checkout too: a recipe run as `python recipes/x.py` imports kbench, not installed there
    print(f"[gpu-kit] unpacked into {site}: export PYTHONPATH={site}:{ROOT}")


def _split(path, out_dir, part_bytes):
    parts = []
    with open(path, "rb") as f:
        while True:
            chunk = f.read(part_bytes)
            if not chunk:
                return parts
            name = f"part-{len(parts) + 1:02d}"
            with open(os.path.join(out_dir, name), "wb") as out:
                out.write(chunk)
            parts.append(name)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class _OneLineParser(argparse.ArgumentParser):
    """A usage error as one `error:` line, exit status 2, as kbench's own commands say it."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = _OneLineParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="here: build the parts (needs pip and a network)")
    packing.add_argument("--dir", default=os.path.join(ROOT, ".gpukit"))
    packing.add_argument("--part-mb", type=int, default=60,
                         help="MiB per part (the device tool carries 64 MiB per call, the "
                              "repository included)")
    unpacking = verbs.add_parser("unpack", help="there: check the parts and extract them")
    unpacking.add_argument("--dir", default=os.path.join(ROOT, ".gpukit"))
    unpacking.add_argument("--site", default="/tmp/kbench-site")
    args = parser.parse_args(argv)
    try:
        if args.verb == "pack":
            if not 1 <= args.part_mb <= 63:
                raise KitError(f"--part-mb {args.part_mb}: give 1 to 63 (the device tool "
                               "carries 64 MiB per call, the repository included)")
            pack(args.dir, args.part_mb)
        else:
            unpack(args.dir, args.site)
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: pip failed (exit {exc.returncode}); it needs a network to the package "
              "index", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
