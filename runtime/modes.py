"""The executable's modes: --info, -p, and serving (the default)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from runtime import backends, hardware, model_source, packaged, supervisor
from runtime.engine import Engine, EngineOptions, Sampling
from runtime.model_source import ModelSource, OwnBundle


def dispatch(
    obj: dict[str, Any],
    *,
    explicit_port: bool,
    model: Path | None,
    prompt: str | None,
    info: bool,
    verify: bool,
    host: str,
    port: int,
    ctx_size: int,
    parallel: int | None,
    max_waiting: int,
    threads: int | None,
    temperature: float,
    n_predict: int,
    system_prompt: str | None,
    cpu_variant: str | None,
    gpu: str,
    gpu_layers: int | None,
    nobrowser: bool,
    verbose: bool,
) -> None:
    own: OwnBundle = obj["own"]
    source = model_source.resolve(model, own)
    if verify and source.bundle is not None:
        model_source.verify(source.bundle)
        click.echo(f"llamabox: {source.bundle.path.name}: model SHA-256 OK", err=True)
    cpu, cpu_backend = hardware.choose_cpu_kernels(cpu_variant, say=lambda line: click.echo(f"llamabox: {line}", err=True))
    for warning in cpu_backend.warnings:
        click.echo(f"llamabox: warning: {warning}", err=True)
    if not info:
        supervisor.supervise(cpu_backend.variant)
    machine = hardware.add_gpu(cpu, cpu_backend, gpu, gpu_layers)
    if info:
        print_info(source, machine)
        return

    engine = Engine(
        source.location,
        EngineOptions(
            ctx_size=ctx_size,
            parallel=1 if prompt is not None else parallel,
            max_waiting=max_waiting,
            threads=threads or backends.default_threads(),
            gpu_layers=machine.offload.layers,
            system_prompt=system_prompt,
            verbose=verbose,
        ),
    )
    sampling = Sampling(temperature=temperature, max_tokens=n_predict if n_predict > 0 else None)
    if prompt is not None:
        run_prompt(engine, prompt, sampling)
        return

    from runtime.serve import bind, serve
    from runtime.server.settings import ServerSettings

    sock = bind(host, port, explicit_port)
    click.echo(f"llamabox: loaded {source.name} in {time.monotonic() - obj['started']:.2f} s, {engine.parallel} slots of {engine.n_ctx} tokens of context", err=True)
    for line in machine.lines():
        click.echo(f"llamabox: {line}", err=True)
    settings = ServerSettings(
        model_id=source.name,
        started_at=int(time.time()),
        fingerprint=_fingerprint(source),
        temperature=temperature,
        n_predict=sampling.max_tokens,
        ui_dir=packaged.ui_dir(),
        hardware=machine.as_dict(),
    )
    serve(engine, settings, sock, open_browser=not nobrowser)


def run_prompt(engine: Engine, text: str, sampling: Sampling) -> None:
    prompt = engine.chat_prompt([{"role": "user", "content": text}]) if engine.has_chat_template else engine.text_prompt(text)
    for chunk in engine.stream(prompt, sampling):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def print_info(source: ModelSource, machine: hardware.Hardware) -> None:
    if source.bundle is not None:
        click.echo("Manifest:")
        click.echo(json.dumps(_manifest_dict(source), indent=2, sort_keys=True))
    else:
        click.echo(f"Model: {source.location.path}")
    for line in machine.lines():
        click.echo(line)


def _manifest_dict(source: ModelSource) -> dict[str, Any]:
    assert source.bundle is not None
    return json.loads(source.bundle.manifest.to_json())


def _fingerprint(source: ModelSource) -> str:
    if source.bundle is not None:
        return "fp_" + source.bundle.manifest.model.sha256[:12]
    return "fp_" + hashlib.sha256(str(source.location.path).encode()).hexdigest()[:12]
