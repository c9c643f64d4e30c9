"""The executable's modes: --info, -p, --chat, and serving (the default)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import click

from runtime import hardware, model_source, packaged, supervisor
from runtime.cache_types import UNQUANTIZED
from runtime.devices import cpu as cpu_module
from runtime.devices import offload
from runtime.cache_plan import CachePlan, plan_cache
from runtime.engine import DeviceLost, DraftOptions, Engine, EngineOptions, LoraFile, Sampling
from runtime.engine.templates import TemplateChoice
from runtime.engine.loader import model_facts
from runtime.errors import LlamaboxError
from runtime.model_source import ModelLocation, ModelSource, OwnBundle
from runtime.server.settings import Access, Endpoints, ModelFacts, ServerSettings, Tls


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
    api_key: tuple[str, ...]  # --api-key, comma-separated ones split
    api_key_file: TextIO | None
    ssl_key_file: Path | None
    ssl_cert_file: Path | None
    alias: str | None
    slots: bool
    slot_save_path: Path | None
    props: bool
    webui: bool
    cont_batching: bool  # always on: accepted for llama-server's scripts
    offline: bool  # always so: accepted for llama-server's scripts
    allowed_hosts: tuple[str, ...]
    cors_origins: tuple[str, ...]
    ctx_size: int | None  # None: the model's own, capped by memory
    ctx_per_slot: bool
    parallel: int | None
    max_waiting: int
    threads: int | None
    threads_batch: int | None
    batch_size: int
    ubatch_size: int
    load_mode: str | None
    mlock: bool
    no_mmap: bool
    numa: str | None
    context_shift: bool
    n_keep: int
    truncate_prompt: bool
    lora: tuple[tuple[Path, float], ...]
    lora_scaled: tuple[tuple[Path, float], ...]
    lora_init_without_apply: bool
    model_draft: Path | None
    rpc_worker: bool
    rpc_mem: int | None  # MiB a worker offers
    rpc: str | None  # HOST:PORT,... of --rpc-worker machines
    rpc_allow_remote: bool
    tensor_split: str | None
    reranking: bool  # the model itself ranks (llama-server's --reranking)
    spec_type: str | None  # None: speculative decoding where -md gives a draft
    draft_max: int
    draft_min: int
    draft_p_min: float
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
    reasoning_format: str
    reasoning: str  # on, off or auto: the template's enable_thinking
    reasoning_budget: int
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
    def weights_load_mode(self) -> str:
        """llama.cpp's load mode (loader.LOAD_MODES) from -lm, or from llama-server's older --mlock and --no-mmap."""
        if self.load_mode is not None and (self.mlock or self.no_mmap):
            raise LlamaboxError("-lm/--load-mode replaces --mlock and --no-mmap; give one of them")
        if self.load_mode == "dio":
            raise LlamaboxError(
                "-lm dio: llama.cpp reads with direct I/O only from a path, and the runtime reads the weights through its own "
                "open file (a bundle's region of itself); use -lm none to read them into memory, or leave -lm out"
            )
        if self.load_mode is not None:
            return self.load_mode
        if self.mlock:
            return "mlock" if self.no_mmap else "mmap+mlock"
        return "none" if self.no_mmap else "auto"

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
            reasoning_budget=self.reasoning_budget,
        )


def dispatch(own: OwnBundle, started: float, options: RunOptions) -> None:
    if options.chat and options.prompt is not None:
        raise LlamaboxError("choose one of -p (one prompt, then exit) and --chat (a conversation in the terminal)")
    if options.flash_attn == "off" and options.cache_type_v not in UNQUANTIZED:
        raise LlamaboxError(f"-ctv {options.cache_type_v} needs flash attention; leave out -fa off, or use -ctv f16")
    if options.rpc_worker:
        return _run_rpc_worker(options)
    split = _tensor_split(options.tensor_split)  # a mistake there is said before any worker is asked
    load_mode = options.weights_load_mode
    serving = not (options.info or options.chat or options.prompt is not None)
    access = _access(options) if serving else None
    source = model_source.resolve(options.model, own)
    if options.verify and source.bundle is not None:
        model_source.verify(source.bundle)
        click.echo(f"llamabox: {source.bundle.path.name}: model SHA-256 OK", err=True)
    cpu, cpu_backend = hardware.choose_cpu_kernels(options.cpu_variant, say=_say)
    for warning in cpu_backend.warnings:
        click.echo(f"llamabox: warning: {warning}", err=True)
    if not options.info:
        supervisor.supervise(cpu_backend.variant)
    if options.numa is not None:
        hardware.numa_init(options.numa)
    machine = hardware.add_gpus(cpu, cpu_backend, options.gpu, say=_say)
    if options.rpc:
        machine, all_there = _with_workers(machine, options, serving)
        if split and not all_there:
            _say("--tensor-split left out: it named the devices of a worker that is gone; the layers go by free memory")
            split = ()
    parallel = 1 if options.prompt is not None or options.chat else options.parallel
    machine = machine.placed(_place(source, machine, options, parallel, split))
    if options.rpc and supervisor.restarts():
        _check_fits_without_workers(machine.offload, model_facts(source.location, options.cache_type_k, options.cache_type_v))
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
            threads_batch=options.threads_batch,
            batch_size=options.batch_size,
            ubatch_size=options.ubatch_size,
            load_mode=load_mode,
            context_shift=options.context_shift,
            n_keep=options.n_keep,
            truncate_prompt=options.truncate_prompt,
            lora=_adapters(options, source),
            draft=_draft(options, own, source),
            embedding=next((location for _, location in model_source.companions(source, "embedding")), None),
            reranker=next((location for _, location in model_source.companions(source, "reranker")), None),
            reranking=options.reranking,
            draft_options=DraftOptions(options.draft_max, options.draft_min, options.draft_p_min),
            gpu_layers=placement.layers,
            gpu_devices=tuple(g.index for g in placement.gpus),
            tensor_split=placement.split,
            system_prompt=options.system_prompt,
            verbose=options.verbose,
            cache_type_k=options.cache_type_k,
            cache_type_v=options.cache_type_v,
            flash_attn=options.flash_attn,
            template=TemplateChoice(options.chat_template, options.jinja),
            # -rea on|off as llama-server sets it: enable_thinking for every chat, under --chat-template-kwargs.
            template_kwargs={**({"enable_thinking": options.reasoning == "on"} if options.reasoning != "auto" else {}), **options.chat_template_kwargs},
        ),
    )
    if options.rpc:
        from runtime.devices import rpc

        rpc.on_connection_lost(lambda endpoint: _worker_lost(endpoint, engine, serving))
        if not options.verbose:
            rpc.quiet_head_log()
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
            assert access is not None
            run_server(engine, options, access, source, machine, started)


def _slots_line(cache: CachePlan) -> str:
    if cache.shared:
        return f"{cache.cells} tokens shared by {cache.parallel} slots (one request may use all of them)"
    return f"{cache.parallel} slots of {cache.per_request} tokens each (--ctx-per-slot)"


def _say(line: str) -> None:
    click.echo(f"llamabox: {line}", err=True)


def _with_workers(machine: hardware.Hardware, options: RunOptions, serving: bool) -> tuple[hardware.Hardware, bool]:
    """--rpc: the workers' devices beside this machine's GPUs, and whether every worker named is there. Where a
    worker's connection drops while the model runs, the requests in flight fail with a 503 and the supervisor
    starts the model again without that worker (serving), or the run ends (-p, --chat, --info)."""
    from runtime.devices import rpc

    assert options.rpc is not None
    endpoints = rpc.parse_endpoints(options.rpc)
    again = supervisor.restarts() > 0  # after a worker was lost: those that are still gone are left out
    workers = rpc.add_workers(endpoints, say=_say if again else None)
    if again and not workers and not machine.gpus:
        _say("no RPC worker is left: the model runs on this machine's CPU")
    rpc.on_connection_lost(lambda endpoint: _worker_lost(endpoint, None, serving))
    return machine.with_workers(tuple(workers)), len({w.endpoint for w in workers}) == len(endpoints)


def _worker_lost(endpoint: str, engine: Engine | None, serving: bool) -> None:
    """Called on ggml's thread that found the worker's connection gone, just before ggml would abort the process.
    Serving: fail every request with a 503 (DeviceLost), give the answers a moment to leave, and hand over to the
    supervisor, which starts the model again on what is left. With -p or --chat: one line and exit 1. Never returns."""
    if not serving:
        _say(f"lost the RPC worker {endpoint} (its connection dropped); start it again, or leave it out of --rpc")
        sys.stderr.flush()
        os._exit(1)
    _say(f"lost the RPC worker {endpoint} (its connection dropped); the requests in flight failed; starting again without it")
    if engine is not None:
        engine.fail_everything(DeviceLost(f"the RPC worker {endpoint} dropped out; the server is starting again without it, try again shortly"))
        time.sleep(1.0)  # the event loop sends the 503s and the streams' error events meanwhile
    supervisor.start_again()


def _tensor_split(text: str | None) -> tuple[float, ...]:
    """-ts 3,1 as llama-server reads it (commas or slashes)."""
    if not text:
        return ()
    try:
        return tuple(float(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        raise LlamaboxError(f"--tensor-split {text!r}: give numbers separated by commas, one per device, e.g. 3,1") from None


def _check_fits_without_workers(placement: offload.Offload, facts: offload.ModelFacts) -> None:
    """After a worker was lost: the layers that now stay on this CPU must fit its memory, else a clear exit."""
    on_cpu = facts.weights_bytes * (placement.total_layers - placement.layers) // max(placement.total_layers, 1)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if on_cpu > memory:
        raise LlamaboxError(
            f"without the lost RPC worker the model does not fit: {on_cpu >> 20:,} MiB of it would be on this machine, "
            f"which has {memory >> 20:,} MiB; start the worker again, then start llamabox again"
        )


def _run_rpc_worker(options: RunOptions) -> None:
    from runtime import rpc_worker
    from runtime.devices import rpc

    rpc_worker.run(
        rpc_worker.WorkerSettings(
            host=options.host,
            port=options.port if options.explicit_port else rpc.PORT,
            allow_remote=options.rpc_allow_remote,
            cpu_variant=options.cpu_variant,
            gpu=options.gpu,
            threads=options.threads,
            options=rpc.WorkerOptions(max_bytes=(options.rpc_mem or 0) << 20, verbose=options.verbose),
        )
    )


def _draft(options: RunOptions, own: OwnBundle, source: ModelSource) -> ModelLocation | None:
    """The draft model for speculative decoding: -md's, else the one the bundle carries; none with --spec-type none
    or --draft-max 0."""
    carried = next((location for _, location in model_source.companions(source, "draft")), None)
    if options.model_draft is None and carried is None:
        if options.spec_type == "draft-simple":
            raise LlamaboxError("--spec-type draft-simple needs a draft model: give one with -md DRAFT.gguf")
        return None
    if options.draft_min > options.draft_max:
        raise LlamaboxError(f"--draft-min {options.draft_min} is above --draft-max {options.draft_max}: no draft would ever be checked")
    if options.spec_type == "none" or options.draft_max == 0:
        return None
    return model_source.resolve(options.model_draft, own).location if options.model_draft else carried


def _adapters(options: RunOptions, source: ModelSource) -> tuple[LoraFile, ...]:
    """The LoRA adapters the bundle carries (at their baked scales), then --lora's and --lora-scaled's."""
    def scale(given: float) -> float:
        return 0.0 if options.lora_init_without_apply else given

    carried = [LoraFile(location.path, scale(c.scale if c.scale is not None else 1.0), location.offset, c.file_name)
               for c, location in model_source.companions(source, "lora")]
    return (*carried, *(LoraFile(path, scale(given)) for path, given in (*options.lora, *options.lora_scaled)))


def _place(source: ModelSource, machine: hardware.Hardware, options: RunOptions, parallel: int | None, split: tuple[float, ...]) -> offload.Offload:
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
        split=split,
        ubatch=options.ubatch_size,
        flexible=parallel is None if options.ctx_per_slot else options.ctx_size is None,
    )
    return offload.plan(list(machine.gpus), facts, request)


def _access(options: RunOptions) -> Access:
    """Who may talk to the server, from the command line; the key file and the TLS files are read here, before the
    model loads, so that a mistake in them is said at once."""
    keys = list(options.api_key)
    if options.api_key_file is not None:
        with options.api_key_file as lines:
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not keys:
            raise LlamaboxError(f"--api-key-file {options.api_key_file.name} holds no key (one a line; # starts a comment)")
    tls = None
    if options.ssl_key_file or options.ssl_cert_file:
        if not (options.ssl_key_file and options.ssl_cert_file):
            raise LlamaboxError("HTTPS needs both --ssl-key-file and --ssl-cert-file")
        tls = Tls.load(options.ssl_key_file, options.ssl_cert_file)
    return Access(tuple(keys), options.allowed_hosts, options.cors_origins, access_log=options.verbose, tls=tls)


def run_server(engine: Engine, options: RunOptions, access: Access, source: ModelSource, machine: hardware.Hardware, started: float) -> None:
    from runtime.serve import Listeners, has_display, serve

    listeners = Listeners.open(options.host, options.port, options.explicit_port, options.ollama_port)
    click.echo(
        f"llamabox: loaded {source.name} in {time.monotonic() - started:.2f} s, {_slots_line(engine.cache)}; "
        f"{machine.offload.note}",
        err=True,
    )
    for line in machine.lines():
        click.echo(f"llamabox: {line}", err=True)
    if not access.api_keys and options.host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"llamabox: warning: listening on {options.host} without --api-key: anyone who can reach this machine can use the model", err=True)
    aliases = tuple(name.strip() for name in (options.alias or "").split(",") if name.strip())
    settings = ServerSettings(
        model_id=aliases[0] if aliases else source.name,
        aliases=aliases,
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
        access=access,
        metrics=options.metrics,
        endpoints=Endpoints(slots=options.slots, props=options.props, webui=options.webui, slot_save_path=options.slot_save_path),
        reasoning_format=options.reasoning_format,
        devices_can_drop=options.rpc is not None,
    )
    browser = options.webui and not options.nobrowser
    if browser and not has_display() and sys.stdin.isatty():
        click.echo("llamabox: no display to open the chat page on; to chat in this terminal instead, run with --chat", err=True)
    serve(engine, settings, listeners, open_browser=browser)


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
