"""The executable's modes: --info, -p, --chat, and serving (the default)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from runtime import hardware, model_source, packaged, supervisor
from runtime.cache_types import UNQUANTIZED
from runtime.devices import cpu as cpu_module
from runtime.devices import offload
from runtime.cache_plan import CachePlan, plan_cache
from runtime.engine import Engine, EngineOptions, Sampling
from runtime.engine.templates import TemplateChoice
from runtime.engine.loader import model_facts
from runtime.errors import LlamaboxError
from runtime.model_source import ModelSource, OwnBundle


@dataclass(frozen=True)
class RunOptions:
    """The command line, parsed (cli.py)."""

    model: Path | None
    prompt: str | None
    chat: bool
    info: bool
    verify: bool
    host: str
    port: int
    explicit_port: bool
    ollama_port: int | None
    api_key: str | None
    allowed_hosts: tuple[str, ...]
    cors_origins: tuple[str, ...]
    ctx_size: int | None  # None: the model's own, capped by memory
    ctx_per_slot: bool
    parallel: int | None
    max_waiting: int
    threads: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int
    n_predict: int
    system_prompt: str | None
    chat_template: str | None
    jinja: bool
    chat_template_kwargs: dict[str, Any]
    cpu_variant: str | None
    gpu: str
    gpu_layers: int | None  # None: auto
    gpu_device: str | None
    nobrowser: bool
    verbose: bool
    metrics: bool
    cache_type_k: str
    cache_type_v: str
    flash_attn: str

    @property
    def sampling(self) -> Sampling:
        """The default sampling settings, which each request may override."""
        return Sampling(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            seed=None if self.seed < 0 else self.seed,
            max_tokens=self.n_predict if self.n_predict > 0 else None,
        )


def dispatch(own: OwnBundle, started: float, options: RunOptions) -> None:
    if options.chat and options.prompt is not None:
        raise LlamaboxError("choose one of -p (one prompt, then exit) and --chat (a conversation in the terminal)")
    if options.flash_attn == "off" and options.cache_type_v not in UNQUANTIZED:
        raise LlamaboxError(f"-ctv {options.cache_type_v} needs flash attention; leave out -fa off, or use -ctv f16")
    source = model_source.resolve(options.model, own)
    if options.verify and source.bundle is not None:
        model_source.verify(source.bundle)
        click.echo(f"llamabox: {source.bundle.path.name}: model SHA-256 OK", err=True)
    cpu, cpu_backend = hardware.choose_cpu_kernels(options.cpu_variant, say=_say)
    for warning in cpu_backend.warnings:
        click.echo(f"llamabox: warning: {warning}", err=True)
    if not options.info:
        supervisor.supervise(cpu_backend.variant)
    machine = hardware.add_gpus(cpu, cpu_backend, options.gpu, say=_say)
    parallel = 1 if options.prompt is not None or options.chat else options.parallel
    machine = machine.placed(_place(source, machine, options, parallel))
    if options.info:
        cache = machine.offload.cache  # planned already where a GPU's fit counted with it
        if cache is None:
            facts = model_facts(source.location, options.cache_type_k, options.cache_type_v)
            cache = plan_cache(options.ctx_size, options.ctx_per_slot, parallel, facts.kv_bytes_per_token, facts.n_ctx_train)
        print_info(source, machine, cache)
        return

    placement = machine.offload
    fitted = placement.cache  # the cache the GPU's fit counted with (None on the CPU: the engine plans it)
    engine = Engine(
        source.location,
        EngineOptions(
            ctx_size=fitted.per_request if fitted else options.ctx_size,
            ctx_per_slot=options.ctx_per_slot,
            parallel=fitted.parallel if fitted else parallel,
            max_waiting=options.max_waiting,
            threads=options.threads or cpu_module.default_threads(),
            gpu_layers=placement.layers,
            gpu_devices=tuple(g.index for g in placement.gpus),
            system_prompt=options.system_prompt,
            verbose=options.verbose,
            cache_type_k=options.cache_type_k,
            cache_type_v=options.cache_type_v,
            flash_attn=options.flash_attn,
            template=TemplateChoice(options.chat_template, options.jinja),
            template_kwargs=options.chat_template_kwargs,
        ),
    )
    for warning in engine.warnings:
        click.echo(f"llamabox: warning: {warning}", err=True)
    if engine.gpu_layers != placement.layers:
        machine = machine.placed(offload.after_fallback(placement, engine.gpu_layers))
    supervisor.running_on(", ".join(g.name for g in machine.offload.gpus) if engine.gpu_layers else "")
    with engine:
        if options.prompt is not None:
            run_prompt(engine, options.prompt, options.sampling)
            exit_without_teardown()
        elif options.chat:
            from runtime import terminal_chat

            terminal_chat.run(engine, options.sampling, source.name)
        else:
            run_server(engine, options, source, machine, started)


def _slots_line(cache: CachePlan) -> str:
    if cache.shared:
        return f"{cache.cells} tokens shared by {cache.parallel} slots (one request may use all of them)"
    return f"{cache.parallel} slots of {cache.per_request} tokens each (--ctx-per-slot)"


def _say(line: str) -> None:
    click.echo(f"llamabox: {line}", err=True)


def _place(source: ModelSource, machine: hardware.Hardware, options: RunOptions, parallel: int | None) -> offload.Offload:
    """Where the model's layers go: nowhere but the CPU without a proven GPU, else as offload.plan fits them."""
    if options.gpu_device and not machine.gpus:
        why = "; ".join(machine.gpu_notes) or "none was found"
        raise LlamaboxError(f"--gpu-device {options.gpu_device}: no usable GPU here ({why})")
    if not machine.gpus:
        return machine.offload
    facts = model_facts(source.location, options.cache_type_k, options.cache_type_v)
    request = offload.OffloadRequest(
        cache=plan_cache(options.ctx_size, options.ctx_per_slot, parallel, facts.kv_bytes_per_token, facts.n_ctx_train),
        layers=options.gpu_layers,
        device=options.gpu_device,
        flexible=parallel is None if options.ctx_per_slot else options.ctx_size is None,
    )
    return offload.plan(list(machine.gpus), facts, request)


def run_server(engine: Engine, options: RunOptions, source: ModelSource, machine: hardware.Hardware, started: float) -> None:
    from runtime.serve import Listeners, has_display, serve
    from runtime.server.settings import Access, ModelFacts, ServerSettings

    listeners = Listeners.open(options.host, options.port, options.explicit_port, options.ollama_port)
    click.echo(
        f"llamabox: loaded {source.name} in {time.monotonic() - started:.2f} s, {_slots_line(engine.cache)}; "
        f"{machine.offload.note}",
        err=True,
    )
    for line in machine.lines():
        click.echo(f"llamabox: {line}", err=True)
    if not options.api_key and options.host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"llamabox: warning: listening on {options.host} without --api-key: anyone who can reach this machine can use the model", err=True)
    settings = ServerSettings(
        model_id=source.name,
        started_at=int(time.time()),
        fingerprint=_fingerprint(source),
        defaults=options.sampling,
        ui_dir=packaged.ui_dir(),
        hardware=machine.as_dict(),
        model=ModelFacts(
            file_name=source.bundle.manifest.model.file_name if source.bundle else source.location.path.name,
            size=_model_size(source),
            architecture=engine.metadata.get("general.architecture", ""),
            parameters=engine.metadata.get("general.size_label", ""),
            license=engine.metadata.get("general.license", ""),
        ),
        system_prompt=options.system_prompt,
        access=Access(options.api_key or None, options.allowed_hosts, options.cors_origins, access_log=options.verbose),
        metrics=options.metrics,
    )
    if not options.nobrowser and not has_display() and sys.stdin.isatty():
        click.echo("llamabox: no display to open the chat page on; to chat in this terminal instead, run with --chat", err=True)
    serve(engine, settings, listeners, open_browser=not options.nobrowser)


def run_prompt(engine: Engine, text: str, sampling: Sampling) -> None:
    prompt = engine.chat_prompt([{"role": "user", "content": text}]) if engine.has_chat_template else engine.text_prompt(text)
    for chunk in engine.stream(prompt, sampling):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def exit_without_teardown() -> None:
    """Leave once the answer is out, without freeing llama.cpp's model, context and threads one by one and
    without Python's own teardown: the OS takes the memory back at once. That is about 30 ms of a 0.4 s
    `-p` run. Only the model's process does this; the supervisor, when there is one, still removes a runtime
    unpacked for this run only (runtime_cache.remove_temporary)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def print_info(source: ModelSource, machine: hardware.Hardware, cache: CachePlan) -> None:
    if source.bundle is not None:
        click.echo("Manifest:")
        click.echo(json.dumps(_manifest_dict(source), indent=2, sort_keys=True))
    else:
        click.echo(f"Model: {source.location.path}")
    for line in machine.lines():
        click.echo(line)
    click.echo(f"Context: {_slots_line(cache)}")
    started = packaged.launch()
    if started is not None and started.temporary:
        click.echo(f"Runtime: unpacked for this run only in {started.runtime_dir} (the cache could not be used)")
    elif started is not None:
        click.echo(
            f"Runtime: unpacked once in {started.runtime_dir.resolve()}, kept for later starts "
            f"(remove {started.runtime_dir.parent} to free the space; LLAMABOX_CACHE places it)"
        )


def _manifest_dict(source: ModelSource) -> dict[str, Any]:
    assert source.bundle is not None
    return json.loads(source.bundle.manifest.to_json())


def _model_size(source: ModelSource) -> int:
    return source.bundle.manifest.model.size if source.bundle is not None else source.location.path.stat().st_size


def _fingerprint(source: ModelSource) -> str:
    if source.bundle is not None:
        return "fp_" + source.bundle.manifest.model.sha256[:12]
    return "fp_" + hashlib.sha256(str(source.location.path).encode()).hexdigest()[:12]
