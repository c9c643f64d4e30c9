"""Which model to run: the one inside this executable, or one named with -m."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime import bundle_format, packaged
from runtime.bundle_format import Bundle, Companion
from runtime.errors import BundleError, LlamaboxError, ModelFileError


@dataclass(frozen=True)
class ModelLocation:
    """Where the GGUF bytes are: a whole file (offset 0) or a region inside a bundle."""

    path: Path
    offset: int = 0


@dataclass(frozen=True)
class ModelSource:
    location: ModelLocation
    name: str
    bundle: Bundle | None


@dataclass(frozen=True)
class OwnBundle:
    """This executable's own bundle, or why it has none."""

    bundle: Bundle | None
    problem: LlamaboxError | None

    @property
    def default_args(self) -> list[str]:
        return self.bundle.manifest.default_args if self.bundle else []


def own_bundle() -> OwnBundle:
    """Open the file the user ran as a bundle (only when frozen by PyInstaller)."""
    own = packaged.own_file()
    if own is None:
        return OwnBundle(None, LlamaboxError("no model given: run with -m MODEL.gguf (or a .run bundle)"))
    try:
        return OwnBundle(bundle_format.open_bundle(own), None)
    except LlamaboxError as exc:
        return OwnBundle(None, exc)


def resolve(model: Path | None, own: OwnBundle) -> ModelSource:
    """The model given with -m (a GGUF or another bundle), else this executable's own."""
    if model is None:
        if own.bundle is None:
            assert own.problem is not None
            raise own.problem
        return _from_bundle(own.bundle)
    try:
        with open(model, "rb") as f:
            magic = f.read(4)
            trailer = bundle_format.read_trailer(f)
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {model}") from None
    except IsADirectoryError:
        raise ModelFileError(f"{model} is a directory, not a model file") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {model}: {exc.strerror}") from None
    if trailer is not None:
        return _from_bundle(bundle_format.open_bundle(model))
    if magic != bundle_format.GGUF_MAGIC:
        raise ModelFileError(f"{model} is neither a GGUF model nor a llamabox bundle")
    return ModelSource(location=ModelLocation(path=model.resolve()), name=model.stem, bundle=None)


def _from_bundle(bundle: Bundle) -> ModelSource:
    return ModelSource(
        location=ModelLocation(path=bundle.model_path.resolve(), offset=bundle.model_offset),
        name=bundle.manifest.name,
        bundle=bundle,
    )


def companions(source: ModelSource, role: str) -> list[tuple[Companion, ModelLocation]]:
    """The GGUFs of `role` (bundle_format.COMPANION_ROLES) the model's bundle carries, and where each is."""
    if source.bundle is None:
        return []
    return [(c, ModelLocation(source.bundle.path.resolve(), c.offset)) for c in source.bundle.manifest.companions if c.role == role]


def verify(bundle: Bundle) -> None:
    """Full SHA-256 check of the embedded model and what it carries (the start-up check only looks at sizes)."""
    actual = bundle_format.hash_model(bundle)
    if actual != bundle.manifest.model.sha256:
        raise BundleError(
            f"{bundle.path.name}: the embedded model is damaged (its SHA-256 does not match the manifest); "
            "download or build it again"
        )
    for companion in bundle.manifest.companions:
        if bundle_format.hash_region(bundle.path, companion.offset, companion.size) != companion.sha256:
            raise BundleError(
                f"{bundle.path.name}: the {companion.role} model {companion.file_name} inside it is damaged (its SHA-256 "
                "does not match the manifest); download or build it again"
            )



def licence_text(source: ModelSource) -> str:
    """What the bundle records about the model's licence: the GGUF's `general.license` and the licence file."""
    if source.bundle is None:
        return f"{source.location.path.name} is a plain GGUF; its licence is in its metadata (general.license) or where you got it"
    manifest = source.bundle.manifest
    stated = manifest.metadata.get("license")
    lines = [f"Model: {manifest.name}", f"Licence (GGUF general.license): {stated or 'not stated'}"]
    if manifest.license_text:
        lines += ["", manifest.license_text.rstrip("\n")]
    elif not stated:
        lines.append("The bundle carries no licence information; ask whoever gave it to you under which terms you may use it.")
    return "\n".join(lines)
