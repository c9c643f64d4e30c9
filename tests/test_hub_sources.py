"""`llamabox build` from Hugging Face sources and split models, against a local fake Hub (tests/fake_hub.py).

huggingface_hub runs for real (HF_ENDPOINT points it at the fake Hub, HF_HOME and HF_HUB_CACHE at
this test's directory): downloads, cache hits, resumed transfers, offline mode, tokens and the Hub's
error codes all go through the library's own code. Also here: the parts of a split model merged into
one bundle, and builds stopped by signals leaving nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from bundler import atomic
from bundler.hub import choose_parts, quant_label
from runtime import bundle_format
from runtime.errors import LlamaboxError, ModelFileError
from tests.conftest import ROOT
from tests.fake_hub import FakeHub
from tests.split_gguf import split_gguf
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
SPLIT_REPO = "test-org/SmolLM2-split-GGUF"
GATED = "test-org/gated-GGUF"
REAL = "SmolLM2-135M-Instruct-Q4_1.gguf"
PROMPT = "Name three colors."
GOOD_TOKEN = "hf_good_token"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small GGUFs standing in for the quantizations not built into real bundles (different licences tell them apart)."""
    d = tmp_path_factory.mktemp("tiny")
    return {q: write_tiny_gguf(d / f"{q}.gguf", license=f"license-{q.lower()}") for q in ("Q4_K_M", "Q8_0", "F16", "IQ4_XS", "Q5_K_M")}


@pytest.fixture(scope="module")
def split_parts(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> list[Path]:
    """SmolLM2 split into three parts by the `gguf` package (as llama.cpp's gguf-split lays them out)."""
    return split_gguf(smollm2, tmp_path_factory.mktemp("split"), 3, stem="SmolLM2-Q4_1")


@pytest.fixture(scope="module")
def hub(smollm2: Path, tiny: dict[str, Path], split_parts: list[Path]) -> Iterator[FakeHub]:
    fake = FakeHub().start()
    fake.add_repo(
        REPO,
        {
            REAL: smollm2,
            "SmolLM2-135M-Instruct-Q4_K_M.gguf": tiny["Q4_K_M"],
            "SmolLM2-135M-Instruct-Q8_0.gguf": tiny["Q8_0"],
            "SmolLM2-135M-Instruct-F16.gguf": tiny["F16"],
            "mmproj-SmolLM2-135M-Instruct-F16.gguf": tiny["F16"],
            "README.md": ROOT / "README.md",
        },
        tags={"v1.0": {REAL: smollm2, "SmolLM2-135M-Instruct-Q8_0.gguf": tiny["Q8_0"]}},
    )
    fake.add_repo("test-org/one-GGUF", {"model-IQ4_XS.gguf": tiny["IQ4_XS"], "README.md": ROOT / "README.md"})
    fake.add_repo("test-org/no-default-GGUF", {"m-Q8_0.gguf": tiny["Q8_0"], "m-Q5_K_M.gguf": tiny["Q5_K_M"]})
    fake.add_repo("test-org/no-GGUF", {"README.md": ROOT / "README.md"})
    fake.add_repo(GATED, {"gated-Q4_K_M.gguf": tiny["Q4_K_M"]}, gated=True, tokens=(GOOD_TOKEN,))
    fake.add_repo(
        SPLIT_REPO,
        {
            **{p.name: p for p in split_parts},
            # A second model whose second part is missing from the repository.
            "Q8_0/SmolLM2-Q8_0-00001-of-00002.gguf": split_parts[0],
        },
    )
    yield fake
    fake.stop()


@pytest.fixture
def hf(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    """The environment of a user of this fake Hub, with an empty cache and no token."""
    hub.clear_log()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    (tmp_path / "hf").mkdir()
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf" / "home"), HF_HUB_CACHE=str(tmp_path / "hf" / "cache"))
    return env


def llamabox(env: dict[str, str], *args: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from bundler.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, env={**env, **extra}, timeout=600,
    )


def build(env: dict[str, str], source: str | Path, out: Path, stub: Path, *args: str, **extra: str):
    return llamabox(env, "build", source, "-o", out, "--stub", stub, *args, **extra)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one 'Error: ...' line of a failed command (no traceback)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def answer(bundle: Path) -> str:
    result = subprocess.run([str(bundle), "-p", PROMPT, "--temp", "0", "-n", "24"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def only(directory: Path, *names: str) -> None:
    """Nothing but `names` in `directory`: no output, no hidden partial file."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


def incomplete_downloads(env: dict[str, str]) -> list[Path]:
    return list(Path(env["HF_HUB_CACHE"]).rglob("*.incomplete"))


# --- choosing the GGUF in a repository (pure) ---------------------------------------------------------------


def test_quant_labels() -> None:
    assert quant_label("bartowski/Qwen2.5-7B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_label("smollm2-135m-instruct.q8_0.gguf") == "Q8_0"
    assert quant_label("Qwen3-30B-A3B-UD-Q4_K_XL.gguf") == "UD-Q4_K_XL"
    assert quant_label("Q4_K_M/model-00001-of-00002.gguf") == "Q4_K_M"
    assert quant_label("model-IQ3_XXS.gguf") == "IQ3_XXS"
    assert quant_label("Qwen2.5-7B.gguf") is None


def test_choose_parts() -> None:
    files = ["a-Q4_K_M.gguf", "a-Q4_K.gguf", "a-Q8_0.gguf", "mmproj-a-f16.gguf", "README.md",
             "big/a-Q6_K-00001-of-00002.gguf", "big/a-Q6_K-00002-of-00002.gguf"]
    assert choose_parts("r", files, None) == ["a-Q4_K_M.gguf"]
    assert choose_parts("r", files, "q4_k") == ["a-Q4_K.gguf"]  # not Q4_K_M: the whole label counts
    assert choose_parts("r", files, "Q6_K") == ["big/a-Q6_K-00001-of-00002.gguf", "big/a-Q6_K-00002-of-00002.gguf"]
    with pytest.raises(ModelFileError, match=r"has no F16 GGUF; it has Q4_K, Q4_K_M, Q8_0, Q6_K"):
        choose_parts("r", files, "F16")  # the vision projector is not a choice
    with pytest.raises(ModelFileError, match=r"has 2 GGUF models; pick one with r:QUANT: Q5_K_M, Q8_0"):
        choose_parts("r", ["m-Q8_0.gguf", "m-Q5_K_M.gguf"], None)
    with pytest.raises(ModelFileError, match=r"a-Q6_K-00001-of-00002.gguf is part 1 of 2, but big/a-Q6_K-00002"):
        choose_parts("r", files[:-1], "Q6_K")
    with pytest.raises(ModelFileError, match="has no GGUF files"):
        choose_parts("r", ["README.md"], None)


# --- Hub sources ---------------------------------------------------------------------------------------------


def test_repo_and_quant_downloads_the_real_model(hub: FakeHub, hf: dict[str, str], stub: Path, smollm2: Path,
                                                 bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "smol.run"
    out.parent.mkdir()
    result = build(hf, f"{REPO}:q4_1", out, stub)  # the quant is case-insensitive
    assert result.returncode == 0, result.stderr
    manifest = bundle_format.open_bundle(out).manifest
    assert manifest.model.sha256 == sha256(smollm2) and manifest.model.file_name == REAL
    source = manifest.source
    assert (source.kind, source.repo, source.revision, source.endpoint) == ("hub", REPO, "main", hub.url)
    assert source.commit == hub.repos[REPO].revisions["main"].commit
    assert [(f.name, f.size, f.sha256) for f in source.files] == [(REAL, smollm2.stat().st_size, sha256(smollm2))]
    assert len(hub.gets(REAL)) == 1
    shown = llamabox(hf, "inspect", out).stdout
    assert f"Hugging Face {REPO}, revision main, commit {source.commit}" in shown
    assert f"Source file:      {REAL} (98,362,432 bytes, sha256 {sha256(smollm2)})" in shown
    assert answer(out) == answer(bundle)
    only(out.parent, "smol.run")


def test_second_build_is_a_cache_hit(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    assert build(hf, f"{REPO}:Q4_1", tmp_path / "a.run", stub).returncode == 0
    hub.clear_log()
    result = build(hf, f"hf://{REPO}/{REAL}", tmp_path / "b.run", stub)
    assert result.returncode == 0, result.stderr
    assert hub.gets(REAL) == []  # at most a HEAD to check the revision: no byte of the model again
    assert bundle_format.open_bundle(tmp_path / "b.run").manifest.model.sha256 == \
        bundle_format.open_bundle(tmp_path / "a.run").manifest.model.sha256


def test_quant_selection(hf: dict[str, str], stub: Path, tiny: dict[str, Path], tmp_path: Path) -> None:
    def built(source: str) -> tuple[str, str]:
        out = tmp_path / "x.run"
        result = build(hf, source, out, stub, "--force")
        assert result.returncode == 0, result.stderr
        manifest = bundle_format.open_bundle(out).manifest
        return manifest.model.file_name, manifest.metadata["license"]

    assert built(REPO) == ("SmolLM2-135M-Instruct-Q4_K_M.gguf", "license-q4_k_m")  # Q4_K_M by default
    assert built(f"{REPO}:q8_0") == ("SmolLM2-135M-Instruct-Q8_0.gguf", "license-q8_0")
    assert built("test-org/one-GGUF") == ("model-IQ4_XS.gguf", "license-iq4_xs")  # the only GGUF
    assert built(f"hf://{REPO}/SmolLM2-135M-Instruct-F16.gguf") == ("SmolLM2-135M-Instruct-F16.gguf", "license-f16")

    line = error_line(build(hf, "test-org/no-default-GGUF", tmp_path / "y.run", stub))
    assert line.endswith("has 2 GGUF models; pick one with test-org/no-default-GGUF:QUANT: Q5_K_M, Q8_0"), line
    line = error_line(build(hf, f"{REPO}:Q2_K", tmp_path / "y.run", stub))
    assert line.endswith(f"{REPO} has no Q2_K GGUF; it has F16, Q4_1, Q4_K_M, Q8_0"), line
    assert "has no GGUF files" in error_line(build(hf, "test-org/no-GGUF", tmp_path / "y.run", stub))
    only(tmp_path, "x.run", "hf")


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("test-org/no-such-repo", (), "no model repository test-org/no-such-repo on the Hugging Face Hub"),
        ("hf://test-org/no-such-repo/m.gguf", (), "no model repository test-org/no-such-repo"),
        (f"hf://{REPO}/SmolLM2-135M-Instruct-Q3_K_S.gguf", (), f"{REPO} has no file SmolLM2-135M-Instruct-Q3_K_S.gguf"),
        (REPO, ("--revision", "v9"), f"{REPO} has no revision 'v9'"),
        (f"{REPO}:Q4_K_M", ("--revision", "v1.0"), f"{REPO} has no Q4_K_M GGUF at revision v1.0; it has Q4_1, Q8_0"),
        ("hf://test-org/x/README.md", (), "is not a GGUF file"),
    ],
)
def test_missing_repo_file_revision_quant(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path,
                                         source: str, extra: tuple[str, ...], message: str) -> None:
    assert message in error_line(build(hf, source, tmp_path / "x.run", stub, *extra))
    only(tmp_path, "hf")
    assert not list(Path(hf["HF_HUB_CACHE"]).rglob("*.gguf"))


def test_revision_is_pinned_and_recorded(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    result = build(hf, f"{REPO}:Q8_0", tmp_path / "x.run", stub, "--revision", "v1.0")
    assert result.returncode == 0, result.stderr
    source = bundle_format.open_bundle(tmp_path / "x.run").manifest.source
    assert (source.revision, source.commit) == ("v1.0", hub.repos[REPO].revisions["v1.0"].commit)
    assert all("/resolve/main/" not in r.path for r in hub.requests)


def test_gated_repo_needs_a_token(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    out = tmp_path / "gated.run"
    line = error_line(build(hf, GATED, out, stub))
    assert f"{GATED} is gated: accept its conditions on {hub.url}/{GATED}" in line and "HF_TOKEN" in line
    assert [r.status for r in hub.requests if "/resolve/" in r.path] == [401]
    line = error_line(build(hf, GATED, out, stub, HF_TOKEN="hf_someone_else"))
    assert "your Hugging Face token has no access yet" in line
    assert not out.exists()
    hub.clear_log()
    result = build(hf, GATED, out, stub, HF_TOKEN=GOOD_TOKEN)
    assert result.returncode == 0, result.stderr
    assert {r.authorization for r in hub.requests if "/resolve/" in r.path} == {f"Bearer {GOOD_TOKEN}"}
    # The token `hf auth login` stores in HF_HOME works as well.
    Path(hf["HF_HOME"]).mkdir(exist_ok=True)
    (Path(hf["HF_HOME"]) / "token").write_text(GOOD_TOKEN)
    result = build({**hf, "HF_HUB_CACHE": str(tmp_path / "hf" / "other-cache")}, GATED, out, stub, "--force")
    assert result.returncode == 0, result.stderr


def test_cut_transfer_resumes_with_a_range_request(hub: FakeHub, hf: dict[str, str], stub: Path, smollm2: Path,
                                                   tmp_path: Path) -> None:
    cut = 30_000_000
    hub.cut(REAL, after=cut)
    result = build(hf, f"{REPO}:Q4_1", tmp_path / "x.run", stub)
    assert result.returncode == 0, result.stderr
    first, second = hub.gets(REAL)
    # The library resumes from the bytes it had written (it writes in 10 MiB chunks): not from zero.
    assert first.range is None and second.status == 206
    assert 0 < int(second.range.removeprefix("bytes=").rstrip("-")) <= cut
    assert bundle_format.open_bundle(tmp_path / "x.run").manifest.model.sha256 == sha256(smollm2)


def cache_blobs(env: dict[str, str], repo: str = REPO) -> Path:
    """Where huggingface_hub's cache keeps the files of `repo` (named by their ETag, here their SHA-256)."""
    return Path(env["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}" / "blobs"


def range_start(request) -> int:
    assert request.range is not None and request.range.startswith("bytes=") and request.range.endswith("-"), request
    return int(request.range.removeprefix("bytes=").removesuffix("-"))


@pytest.mark.parametrize("fault", ["network gone", "Hub failing"])
def test_download_cut_for_good_resumes_on_the_next_build(hub: FakeHub, hf: dict[str, str], stub: Path, smollm2: Path,
                                                         tmp_path: Path, fault: str) -> None:
    """The transfer is cut after 30 MB and then every try fails (the connection closes unanswered through all of
    huggingface_hub's retries, or the Hub answers 503): a one-line error, no output, the downloaded bytes kept in
    the cache. The next build asks only for the rest, and the bundle holds the model byte for byte."""
    out = tmp_path / "out"
    out.mkdir()
    hub.cut(REAL, after=30_000_000)
    fail = hub.drop if fault == "network gone" else hub.outage
    fail(REAL)
    try:
        started = time.monotonic()
        line = error_line(build(hf, f"{REPO}:Q4_1", out / "x.run", stub))
        failed_after = time.monotonic() - started
    finally:
        fail(REAL, on=False)
    assert f"Error: the download of {REAL} from {REPO} was interrupted (" in line, line
    assert line.endswith(" MB done; run the same command again to resume it"), line
    only(out)
    [partial] = incomplete_downloads(hf)
    kept = partial.stat().st_size
    assert partial == cache_blobs(hf) / f"{hub.etag(smollm2)}.incomplete"
    assert 0 < kept <= 30_000_000 and f"with {kept / 1e6:,.1f} of 98.4 MB done" in line, line
    first, *retries = hub.gets(REAL)
    assert first.range is None and retries and all(range_start(r) == kept for r in retries)
    if fault == "network gone":  # huggingface_hub tried again (a second apart) before giving up: no answer each time
        assert len(retries) >= 3 and {r.status for r in retries} == {0} and failed_after > len(retries) - 1

    hub.clear_log()
    result = build(hf, f"{REPO}:Q4_1", out / "x.run", stub)
    assert result.returncode == 0, result.stderr
    [resumed] = hub.gets(REAL)
    assert (range_start(resumed), resumed.status) == (kept, 206)
    assert bundle_format.open_bundle(out / "x.run").manifest.model.sha256 == sha256(smollm2)
    assert llamabox(hf, "verify", out / "x.run").returncode == 0
    assert incomplete_downloads(hf) == [] and sha256(cache_blobs(hf) / hub.etag(smollm2)) == sha256(smollm2)
    only(out, "x.run")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_download_killed_resumes_on_the_next_build(hub: FakeHub, hf: dict[str, str], stub: Path, smollm2: Path,
                                                  tmp_path: Path) -> None:
    """A build killed mid-download (SIGKILL: no cleanup runs) leaves its bytes in the cache, and the next resumes."""
    hub.throttle(REAL, 0.05)
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", "from bundler.cli import main; main()", "build", f"{REPO}:Q4_1", "-o",
             tmp_path / "x.run", "--stub", stub], cwd=ROOT, env=hf, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        partial = cache_blobs(hf) / f"{hub.etag(smollm2)}.incomplete"
        wait_until(lambda: partial.exists() and partial.stat().st_size >= 20 << 20, process, "20 MiB were downloaded")
        process.kill()
        process.communicate(timeout=60)
    finally:
        hub.throttle(REAL, None)
    kept = partial.stat().st_size
    transfer_ended(hub, REAL)
    hub.clear_log()
    result = build(hf, f"{REPO}:Q4_1", tmp_path / "x.run", stub)
    assert result.returncode == 0, result.stderr
    [resumed] = hub.gets(REAL)
    assert range_start(resumed) == kept and resumed.status == 206
    assert bundle_format.open_bundle(tmp_path / "x.run").manifest.model.sha256 == sha256(smollm2)


def test_damaged_partial_download_is_not_bundled(hub: FakeHub, hf: dict[str, str], stub: Path, smollm2: Path,
                                                 tmp_path: Path) -> None:
    """Resumed bytes that do not add up to the Hub's SHA-256 are refused and deleted; the next build starts afresh."""
    blobs = cache_blobs(hf)
    blobs.mkdir(parents=True)
    start = bytearray(smollm2.read_bytes()[: 10 << 20])
    start[5 << 20] ^= 0x01
    partial = blobs / f"{hub.etag(smollm2)}.incomplete"
    partial.write_bytes(start)
    line = error_line(build(hf, f"{REPO}:Q4_1", tmp_path / "x.run", stub))
    assert line.endswith("the partial download was deleted: run the command again to download it afresh"), line
    assert range_start(hub.gets(REAL)[0]) == 10 << 20
    assert not partial.exists() and not (blobs / hub.etag(smollm2)).exists() and not (tmp_path / "x.run").exists()
    hub.clear_log()
    result = build(hf, f"{REPO}:Q4_1", tmp_path / "x.run", stub)
    assert result.returncode == 0, result.stderr
    assert [r.range for r in hub.gets(REAL)] == [None]
    assert bundle_format.open_bundle(tmp_path / "x.run").manifest.model.sha256 == sha256(smollm2)


def test_unreachable_hub(hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    line = error_line(build({**hf, "HF_ENDPOINT": "http://127.0.0.1:9"}, f"{REPO}:Q4_1", tmp_path / "x.run", stub))
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in line and "is not in the cache" in line


def test_offline_mode_uses_the_cache(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    assert build(hf, f"{REPO}:Q4_1", tmp_path / "online.run", stub).returncode == 0
    hub.clear_log()
    result = build(hf, f"{REPO}:q4_1", tmp_path / "offline.run", stub, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert [r for r in hub.requests if "agent-harnesses" not in r.path] == []
    online = bundle_format.open_bundle(tmp_path / "online.run").manifest
    offline = bundle_format.open_bundle(tmp_path / "offline.run").manifest
    assert (offline.model, offline.source) == (online.model, online.source)
    line = error_line(build(hf, f"{REPO}:Q8_0", tmp_path / "x.run", stub, HF_HUB_OFFLINE="1"))
    assert line.endswith(f"{REPO} has no Q8_0 GGUF in the Hugging Face cache (offline); it has Q4_1"), line
    line = error_line(build(hf, "test-org/one-GGUF", tmp_path / "x.run", stub, HF_HUB_OFFLINE="1"))
    assert "is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it" in line


# --- split models ----------------------------------------------------------------------------------------------


def test_split_model_from_the_hub(hub: FakeHub, hf: dict[str, str], stub: Path, smollm2: Path, bundle: Path,
                                  split_parts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "split.run"
    result = build(hf, SPLIT_REPO + ":Q4_1", out, stub)
    assert result.returncode == 0, result.stderr
    manifest = bundle_format.open_bundle(out).manifest
    # Merging is lossless: the parts written by the gguf package merge back into SmolLM2, byte for byte.
    assert manifest.model.sha256 == sha256(smollm2)
    assert manifest.model.file_name == "SmolLM2-Q4_1.gguf" and manifest.name == "SmolLM2-Q4_1"
    assert [(f.name, f.size, f.sha256) for f in manifest.source.files] == [
        (p.name, p.stat().st_size, sha256(p)) for p in split_parts
    ]
    assert [len(hub.gets(p.name)) for p in split_parts] == [1, 1, 1]
    shown = llamabox(hf, "inspect", out).stdout
    assert f"Part 3 of 3:      SmolLM2-Q4_1-00003-of-00003.gguf ({split_parts[2].stat().st_size:,} bytes" in shown
    assert answer(out) == answer(bundle)


def test_split_model_with_a_missing_part_on_the_hub(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    line = error_line(build(hf, f"hf://{SPLIT_REPO}/Q8_0/SmolLM2-Q8_0-00001-of-00002.gguf", tmp_path / "x.run", stub))
    assert "is part 1 of 2, but Q8_0/SmolLM2-Q8_0-00002-of-00002.gguf is missing" in line
    assert [r for r in hub.requests if "/resolve/" in r.path] == []  # refused before any download
    assert not (tmp_path / "x.run").exists()


def test_local_split_model(stub: Path, smollm2: Path, split_parts: list[Path], tmp_path: Path) -> None:
    env = dict(os.environ)
    out = tmp_path / "split.run"
    result = build(env, split_parts[0], out, stub)
    assert result.returncode == 0, result.stderr
    manifest = bundle_format.open_bundle(out).manifest
    assert manifest.model.sha256 == sha256(smollm2)
    assert manifest.source.kind == "local" and [f.name for f in manifest.source.files] == [p.name for p in split_parts]
    assert llamabox(env, "verify", out).returncode == 0

    # A missing part is found before anything is read or written.
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in (split_parts[0], split_parts[2]):
        (parts / p.name).symlink_to(p)
    line = error_line(build(env, parts / split_parts[0].name, tmp_path / "x.run", stub))
    assert line.endswith(f"is part 1 of a model split into 3 files, but {split_parts[1].name} is missing from {parts}; "
                         "put all 3 parts there"), line
    # A part renamed so that its name no longer says it is one.
    (parts / "renamed.gguf").symlink_to(split_parts[1])
    line = error_line(build(env, parts / "renamed.gguf", tmp_path / "x.run", stub))
    assert "renamed.gguf is part 2 of a model split into 3 files, but its name does not say so" in line
    # Parts of different models under one name.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, p in enumerate(split_parts):
        (mixed / p.name).symlink_to(split_parts[0] if i == 1 else p)
    line = error_line(build(env, mixed / split_parts[0].name, tmp_path / "x.run", stub))
    assert "says it is part 1 of 3, but its name makes it part 2 of 3" in line
    assert not (tmp_path / "x.run").exists()


# --- interrupted builds --------------------------------------------------------------------------------------


def sparse_gguf(path: Path, size: int) -> Path:
    """A valid GGUF of `size` bytes of zero weights, stored sparse (so it costs no disk to make)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    n = size // 4
    writer.add_tensor_info("token_embd.weight", (n // 64, 64), np.dtype(np.float32), n * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(path, "r+b") as f:
        data_start = -(-f.seek(0, 2) // 32) * 32
        f.truncate(data_start + n * 4)
    return path


def writing_unnamed_file(pid: int, directory: Path) -> bool:
    """Whether process `pid` holds an unnamed (O_TMPFILE) file open in `directory`."""
    with_fd = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fd) for fd in with_fd.iterdir()]
    except OSError:
        return False
    return any(link.startswith(f"{directory}/#") and link.endswith("(deleted)") for link in links)


def transfer_ended(hub: FakeHub, path: str, timeout: float = 30) -> None:
    """Wait until the fake Hub logs the transfer of `path` a killed client left (it notices only at its next write)."""
    deadline = time.monotonic() + timeout
    while not hub.gets(path):
        assert time.monotonic() < deadline, f"the transfer of {path} never ended on the server"
        time.sleep(0.05)


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the build ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.skipif(sys.platform != "linux", reason="O_TMPFILE and /proc are Linux's")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_while_writing_leaves_nothing(stub: Path, tmp_path: Path, signum: int) -> None:
    model = sparse_gguf(tmp_path / "big.gguf", 1_500_000_000)
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", "from bundler.cli import main; main()", "build", model, "-o", out / "big.run", "--stub", stub],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_until(lambda: writing_unnamed_file(process.pid, out), process, "the output was being written")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode in (128 + signum, -signum)
    if signum != signal.SIGKILL:
        assert process.returncode == 128 + signum
        assert stderr.strip().splitlines()[-1] == f"Error: interrupted ({signal.Signals(signum).name}); {out / 'big.run'} was not written"
        assert "Traceback" not in stderr
    only(out)


@pytest.mark.skipif(sys.platform != "linux", reason="the download's temporary file is found through /proc")
def test_sigterm_while_downloading_leaves_nothing(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    hub.throttle(REAL, 0.2)
    out = tmp_path / "out"
    out.mkdir()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", "from bundler.cli import main; main()", "build", f"{REPO}:Q4_1", "-o", out / "x.run",
             "--stub", stub], cwd=ROOT, env=hf, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        wait_until(lambda: any(p.stat().st_size for p in incomplete_downloads(hf)), process, "the download started")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        hub.throttle(REAL, None)
    transfer_ended(hub, REAL)  # so that no later test sees it in the log
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1].startswith("Error: interrupted (SIGTERM)")
    only(out)
    assert incomplete_downloads(hf) == []


def test_partial_files_without_o_tmpfile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where the output cannot be written unnamed: a locked hidden partial file, deleted on errors and interrupts,
    and by the next build once its writer is gone (SIGKILL); one still being written is left alone."""
    monkeypatch.setattr(atomic, "_unnamed_file", lambda _directory: None)
    target = tmp_path / "x.run"
    with pytest.raises(KeyboardInterrupt), atomic.atomic_write(target) as f:
        f.write(b"half")
        assert [p.name for p in tmp_path.glob(".x.run.*.partial")]
        raise KeyboardInterrupt
    only(tmp_path)

    # A writer killed with SIGKILL leaves its partial file; one that is alive keeps its lock.
    script = (
        "import sys, time; from pathlib import Path; from bundler import atomic\n"
        "atomic._unnamed_file = lambda d: None\n"
        "with atomic.atomic_write(Path(sys.argv[1])) as f:\n"
        "    f.write(b'x'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, target], cwd=ROOT, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    for writer in writers:
        assert writer.stdout.readline() == "writing\n"
    writers[0].kill()
    writers[0].wait()
    partials = sorted(tmp_path.glob(".x.run.*.partial"))
    assert len(partials) == 2
    removed = atomic.remove_stale_partials(target)
    assert len(removed) == 1 and len(list(tmp_path.glob(".x.run.*.partial"))) == 1
    writers[1].kill()
    writers[1].wait()
    with atomic.atomic_write(target) as f:  # the next build clears what the killed writer left
        f.write(b"whole")
    only(tmp_path, "x.run")
    assert target.read_bytes() == b"whole"


def test_output_already_there_is_checked_before_downloading(hub: FakeHub, hf: dict[str, str], stub: Path,
                                                            tmp_path: Path) -> None:
    (tmp_path / "x.run").write_text("precious")
    assert "--force" in error_line(build(hf, f"{REPO}:Q4_1", tmp_path / "x.run", stub))
    assert not [r for r in hub.requests if "/api/models/" in r.path or "/resolve/" in r.path]
    with pytest.raises(LlamaboxError, match="already exists"):
        atomic.check_output(tmp_path / "x.run")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_download_shows_huggingface_hubs_progress_bar(hub: FakeHub, hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    """In a terminal, the download draws huggingface_hub's own progress bar."""
    import fcntl
    import pty
    import struct
    import termios

    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a fresh pty is 0 columns wide
    process = subprocess.Popen(
        [sys.executable, "-c", "from bundler.cli import main; main()", "build", f"{REPO}:Q4_1", "-o", tmp_path / "x.run",
         "--stub", stub], cwd=ROOT, env=hf, stdin=terminal, stdout=terminal, stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        shown += data
    os.close(main)
    assert process.wait(timeout=60) == 0, shown
    text = shown.decode(errors="replace")
    assert f"{REPO}: {REAL}, commit" in text
    assert "SmolLM2-135M-Instruct-Q4_1.gguf: 100%|" in text and "98.4M/98.4M" in text, text


def test_manifest_lists_sources_as_json(hf: dict[str, str], stub: Path, tmp_path: Path) -> None:
    assert build(hf, f"{REPO}:Q8_0", tmp_path / "x.run", stub).returncode == 0
    source = json.loads(llamabox(hf, "inspect", "--json", tmp_path / "x.run").stdout)["source"]
    assert source["kind"] == "hub" and source["repo"] == REPO and len(source["commit"]) == 40
    assert [f["name"] for f in source["files"]] == ["SmolLM2-135M-Instruct-Q8_0.gguf"]
