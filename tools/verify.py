"""``funnel verify``: check a bundle's files against its manifest (presence, size, SHA-256) without loading it.

Given a bundle root, every version under ``versions/`` is checked and the one ``CURRENT``
names is marked; given a version directory, that version alone. Exits 1 if any checked
version is bad, naming each bad file.
"""

import argparse
import os

from funnel.bundle import CURRENT, BundleError, read_manifest


def verify(path: str) -> dict[str, str | None]:
    """Check the version directory ``path``, or every version of the bundle root ``path``.

    Args:
        path: a bundle root (with ``versions/``) or one version directory.

    Returns:
        version directory -> ``None`` when it passes, else the reason it fails.

    Raises:
        BundleError: ``path`` is neither a bundle root nor a version directory.
    """
    versions = os.path.join(path, "versions")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        dirs = [path]
    elif os.path.isdir(versions):
        dirs = [os.path.join(versions, v) for v in sorted(os.listdir(versions)) if not v.startswith(".")]
    else:
        raise BundleError(f"{path}: not a bundle root (no versions/) nor a version directory (no manifest.json)")
    report: dict[str, str | None] = {}
    for d in dirs:
        try:
            read_manifest(d, upgrade=True)
            report[d] = None
        except BundleError as err:
            report[d] = str(err)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="bundle root (checks every version) or one version directory")


def run(args: argparse.Namespace) -> int:
    report = verify(args.path)
    current = None
    pointer = os.path.join(args.path, CURRENT)
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            current = fh.read().strip()
    for d, problem in report.items():
        mark = " (CURRENT)" if os.path.basename(d) == current else ""
        print(f"{'ok ' if problem is None else 'BAD'} {d}{mark}" + ("" if problem is None else f": {problem}"))
    return 0 if all(problem is None for problem in report.values()) else 1
