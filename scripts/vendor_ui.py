"""Vendor the chat page's front-end libraries from the npm registry into templates/vendor/.

The chat page loads nothing from the network: the few libraries it uses are copied into
templates/ and travel inside the executable. This script is how they got there, and how to upgrade
them: each package is pinned to a version and to the sha512 integrity the registry publishes for
it; npm's own client fetches the tarball (`npm pack`), the integrity is checked, and only the built
browser files the page loads are copied, with the package's licence files beside them. The copies
are committed, so building the stub and running the tests need neither npm nor the network.

    python scripts/vendor_ui.py            # fetch the pinned packages, replace templates/vendor/
    python scripts/vendor_ui.py --check    # fetch them and say whether templates/vendor/ matches

To upgrade a package: change its version, run once with `--integrity` to print the new integrity
(read it, compare it with `npm view NAME@VERSION dist.integrity`), paste it in, run again.
One change is made to what is copied: KaTeX's stylesheet lists each font as woff2, woff and ttf;
only the woff2 files are vendored (every browser the page supports reads them), so the other two
are dropped from the stylesheet, which then names only files that exist.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "templates" / "vendor"


@dataclass(frozen=True)
class Package:
    name: str  # on the npm registry
    version: str
    integrity: str  # the registry's dist.integrity for this version
    license: str  # SPDX, as the package declares it
    files: dict[str, str]  # path in the package (a glob for several) -> folder under templates/vendor/<dir>/
    dir: str
    purpose: str


PACKAGES = (
    Package(
        name="marked",
        version="18.2.1",
        integrity="sha512-ii4bxCTCqqwpT86XZWgJNs+ZnAIZksmLGYMViWA7PDIXYIeNo1x6cDdX3JOip9NM/cI6p8z57FxliACboTruMA==",
        license="MIT",
        files={"lib/marked.umd.js": ".", "LICENSE": "."},
        dir="marked",
        purpose="Markdown to HTML",
    ),
    Package(
        name="dompurify",
        version="3.4.18",
        integrity="sha512-ofe3wI/uNm68HInABYFJYqQxRw1EaKAjNdrFVKqjUY+UZurvNd2L/HuQe097s/4RivWiZyP6tT7aoT8atjfhwg==",
        license="(MPL-2.0 OR Apache-2.0)",
        files={"dist/purify.min.js": ".", "LICENSE": ".", "LICENSE-MPL": "."},
        dir="dompurify",
        purpose="sanitizes the HTML made from the model's Markdown",
    ),
    Package(
        name="@highlightjs/cdn-assets",
        version="11.12.0",
        integrity="sha512-KvOKXODaiFmId9xaq3xc5xCL66wVLUuOngDbO9B/kewbFTqdGbn2nJxNhN3H5R1cgDTVj6R8vH0zgiNDEGjpDw==",
        license="BSD-3-Clause",
        files={"highlight.min.js": ".", "styles/github.min.css": ".", "styles/github-dark.min.css": ".", "LICENSE": "."},
        dir="highlight.js",
        purpose="syntax highlighting of code blocks (its common languages)",
    ),
    Package(
        name="katex",
        version="0.19.1",
        integrity="sha512-jG8uKntjSEcm2EpQOh0XturpPuuC9r3Sq5HLHdsFdWZT27E672SF19QEi+of0/YeOy15lDgRhKvr5614uRrEfA==",
        license="MIT",
        files={"dist/katex.min.js": ".", "dist/katex.min.css": ".", "dist/fonts/*.woff2": "fonts", "LICENSE": "."},
        dir="katex",
        purpose="LaTeX math",
    ),
)

_FONT_FALLBACKS = re.compile(r',url\(fonts/[\w-]+\.woff\) format\("woff"\),url\(fonts/[\w-]+\.ttf\) format\("truetype"\)')


def integrity_of(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(package: Package, into: Path) -> bytes:
    """The package's tarball, fetched by npm from the registry it is configured for."""
    spec = f"{package.name}@{package.version}"
    result = subprocess.run(["npm", "pack", spec, "--json", "--pack-destination", str(into)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"vendor_ui: npm pack {spec} failed: {result.stderr.strip().splitlines()[-1:]}")
    filename = json.loads(result.stdout)[0]["filename"]
    return (into / filename).read_bytes()


def extract(package: Package, tarball: bytes, into: Path) -> dict[str, bytes]:
    """The files the page needs, as {path under templates/vendor/: content}."""
    work = into / package.dir
    archive = work.with_suffix(".tgz")
    archive.write_bytes(tarball)
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    root = work / "package"
    out: dict[str, bytes] = {}
    for pattern, folder in package.files.items():
        matches = sorted(root.glob(pattern))
        if not matches:
            sys.exit(f"vendor_ui: {package.name}@{package.version} has no {pattern}")
        for path in matches:
            data = path.read_bytes()
            if path.name == "katex.min.css":
                data, count = _FONT_FALLBACKS.subn("", data.decode())
                if count == 0:
                    sys.exit("vendor_ui: KaTeX's stylesheet no longer lists woff and ttf fallbacks as expected; update _FONT_FALLBACKS")
                data = data.encode()
            out[str(Path(package.dir, folder, path.name))] = data
    return out


def readme(packages: tuple[Package, ...]) -> str:
    rows = "\n".join(
        f"| `{p.dir}/` | [{p.name}](https://www.npmjs.com/package/{p.name}) | {p.version} | {p.license} | {p.purpose} |" for p in packages
    )
    return (
        "# Vendored front-end libraries\n\n"
        "Written by `scripts/vendor_ui.py` (do not edit by hand): each package's built browser files and licence,\n"
        "from the npm registry, pinned by version and sha512 integrity.\n\n"
        "| folder | package | version | licence | used for |\n|---|---|---|---|---|\n"
        f"{rows}\n\n"
        "KaTeX's stylesheet names only its woff2 fonts (the woff and ttf copies are not vendored).\n"
    )


def wanted_files(print_integrity: bool) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="llamabox-vendor-") as tmp:
        for package in PACKAGES:
            tarball = fetch(package, Path(tmp))
            actual = integrity_of(tarball)
            if print_integrity:
                print(f"{package.name}@{package.version}: {actual}")
                continue
            if actual != package.integrity:
                sys.exit(f"vendor_ui: {package.name}@{package.version} has integrity {actual}, expected {package.integrity}; not vendored")
            files.update(extract(package, tarball, Path(tmp)))
    files["README.md"] = readme(PACKAGES).encode()
    return files


def current_files() -> dict[str, bytes]:
    return {str(p.relative_to(VENDOR)): p.read_bytes() for p in sorted(VENDOR.rglob("*")) if p.is_file()} if VENDOR.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether templates/vendor/ matches the pinned packages")
    parser.add_argument("--integrity", action="store_true", help="print each package's integrity as fetched, vendor nothing")
    args = parser.parse_args()
    if shutil.which("npm") is None:
        sys.exit("vendor_ui: needs npm (https://nodejs.org); building and testing do not")
    files = wanted_files(args.integrity)
    if args.integrity:
        return
    if args.check:
        current = current_files()
        differ = sorted(set(files) ^ set(current) | {name for name in files if current.get(name, files[name]) != files[name]})
        for name in differ:
            print(f"differs: templates/vendor/{name}")
        sys.exit(1 if differ else 0)
    if VENDOR.exists():
        shutil.rmtree(VENDOR)
    for name, data in files.items():
        path = VENDOR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"vendor_ui: {len(files)} files, {total / 1024:.0f} KiB in templates/vendor/")


if __name__ == "__main__":
    main()
