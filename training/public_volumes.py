"""Fetch the MNI152 2009a template volumes that ship inside nilearn's wheel (no nilearn install).

    python -m deepregister_training.public_volumes [--out training/data_cache]

Runs ``pip download --no-deps nilearn==0.14.1`` and extracts the T1, grey- and white-matter
volumes; used as real anatomy for the synthetic-deformation (generic) training and its held-out
evaluation. Licence: the MNI ICBM152 2009 templates are freely distributable (see nilearn).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NILEARN = "nilearn==0.14.1"
VOLUMES = {
    "mni152_t1.nii.gz": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni152_gm.nii.gz": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "mni152_wm.nii.gz": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
DEFAULT_OUT = Path(__file__).resolve().parent / "data_cache"


def fetch(out: Path = DEFAULT_OUT) -> list[Path]:
    """The MNI152 volumes in ``out`` (downloaded once)."""
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / name for name in VOLUMES]
    if all(path.exists() for path in targets):
        return targets
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, NILEARN],
                       check=True)
        wheel = next(Path(folder).glob("nilearn-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name, member in VOLUMES.items():
                (out / name).write_bytes(archive.read(member))
    return targets


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for path in fetch(parser.parse_args().out):
        print(path)
