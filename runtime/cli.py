"""The executable's command line: baked-in defaults first, then the user's arguments.

Heavy modules (llama.cpp, the server) are imported only once a mode needs them, so that
`--help` is instant and the bundler can check `--args` without loading the engine.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from runtime import __version__, packaged
from runtime.cache_types import CACHE_TYPES
from runtime.errors import LlamaboxError
from runtime.model_source import OwnBundle, own_bundle

DEFAULT_PORT = 8080


class _LayerCount(click.ParamType):
    """--gpu-layers: auto, or a number of layers (None stands for auto)."""

    name = "auto|N"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or value == "auto" or isinstance(value, int):
            return value if isinstance(value, int) else None
        try:
            count = int(str(value))
        except ValueError:
            count = -1
        if count < 0:
            self.fail(f"{value!r} is neither auto nor a number of layers (0 or more)", param, ctx)
        return count


_LAYERS = _LayerCount()


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, object]:
    """--chat-template-kwargs: a JSON object whose keys are not the template's own variables."""
    if value is None:
        return {}
    from runtime.engine.templates import RESERVED_NAMES  # here, not at the top: it loads llama.cpp

    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON ({exc}); give an object such as '{{\"enable_thinking\": false}}'") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, such as '{\"enable_thinking\": false}'")
    taken = sorted(RESERVED_NAMES & parsed.keys())
    if taken:
        raise click.BadParameter(f"{taken[0]} is the server's to set; leave it out")
    return parsed


def _refused(why: str) -> Callable[[click.Context, click.Parameter, object], object]:
    """A llama-server flag that means nothing for a bundle, or what llamabox does not do: refused in one line that
    names the flag and says why, rather than silently ignored."""

    def refuse(ctx: click.Context, param: click.Parameter, value: object) -> object:
        if value is None or value is False or ctx.resilient_parsing:
            return value
        raise click.ClickException(f"{'/'.join(param.opts)}: {why}")

    return refuse


def _lora_files(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[Path, float], ...]:
    """--lora FILE[,FILE] (scale 1) and --lora-scaled FILE:SCALE[,...], as llama-server's; each file must exist."""
    files = []
    for item in (part.strip() for entry in value for part in entry.split(",") if part.strip()):
        path, scale = item, "1"
        if param.name == "lora_scaled":
            path, colon, scale = item.rpartition(":")
            if not colon or not path:
                raise click.BadParameter(f"{item!r} is not FILE:SCALE, such as adapter.gguf:0.5")
        try:
            number = float(scale)
        except ValueError:
            raise click.BadParameter(f"{scale!r} in {item!r} is not a number") from None
        if not Path(path).is_file():
            raise click.BadParameter(f"{path}: no such file")
        files.append((Path(path), number))
    return tuple(files)


def _keys(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """--api-key: one or more keys, comma-separated and repeatable, as llama-server's."""
    return tuple(key.strip() for item in value for key in item.split(",") if key.strip())


class _Runtime(click.Command):
    """The runtime's command: llamabox's errors as one line, and --help grouped as llama-server's."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LlamaboxError as exc:
            raise click.ClickException(str(exc)) from None

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {"help" if "--help" in param.opts else param.name: param.get_help_record(ctx) for param in self.get_params(ctx)}
        for title, names in HELP_SECTIONS:
            with formatter.section(title):
                formatter.write_dl([record for name in names if (record := records.pop(name, None))])
        assert not any(records.values()), f"options in no --help section: {[n for n, r in records.items() if r]}"


# --help's sections, as llama-server groups its flags (common, sampling, server), then llamabox's own.
HELP_SECTIONS = [
    (
        "Common options (as llama.cpp's)",
        ["model", "threads", "threads_batch", "ctx_size", "batch_size", "ubatch_size", "cache_type_k", "cache_type_v",
         "flash_attn", "gpu_layers", "gpu_device", "load_mode", "mlock", "no_mmap", "numa", "offline", "context_shift", "n_keep",
         "lora", "lora_scaled", "verbose"],
    ),
    ("Speculative decoding (as llama-server's)", ["model_draft", "spec_type", "draft_max", "draft_min", "draft_p_min"]),
    ("Several machines (ggml's RPC backend)", ["rpc_worker", "rpc_mem", "rpc_allow_remote", "rpc", "tensor_split"]),
    ("Sampling options (each request may override them)",
     ["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "n_predict"]),
    (
        "Server options (as llama-server's)",
        ["host", "port", "alias", "parallel", "cont_batching", "api_key", "api_key_file", "ssl_key_file", "ssl_cert_file",
         "cors_origins", "allowed_hosts", "chat_template", "jinja", "chat_template_kwargs", "reasoning_format", "reasoning",
         "reasoning_budget", "reranking",
         "system_prompt", "metrics", "slots", "slot_save_path",
         "props", "webui", "lora_init_without_apply"],
    ),
    (
        "llamabox options",
        ["prompt", "chat", "info", "show_license", "verify", "ctx_per_slot", "truncate_prompt", "max_waiting", "ollama_port", "cpu_variant", "gpu",
         "nobrowser", "version", "help"],
    ),
]


@click.command(cls=_Runtime, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", type=click.Path(path_type=Path), help="Run this GGUF (or .run bundle) instead of the embedded model.")
@click.option(
    "-md",
    "--model-draft",
    "--spec-draft-model",
    "model_draft",
    type=click.Path(path_type=Path),
    help="A small model of the same tokenizer (a GGUF or a .run bundle) that guesses the next tokens, which the model "
    "checks in one step: the same text, sooner where the draft costs far less than the model. Each answer's timings say "
    "how many guesses were right (draft_n_accepted).",
)
@click.option(
    "--spec-type",
    type=click.Choice(["none", "draft-simple"]),
    help="draft-simple: decode speculatively with -md's draft (what -md alone does here); none: not, though -md is given.",
)
@click.option(
    "--spec-draft-n-max",
    "--draft-max",
    "--draft-n",
    "--draft",
    "draft_max",
    default=3,
    show_default=True,
    type=click.IntRange(0),
    help="Tokens the draft model guesses per step at most (0: none).",
)
@click.option(
    "--spec-draft-n-min", "--draft-min", "--draft-n-min", "draft_min", default=0, show_default=True, type=click.IntRange(0),
    help="Fewer guesses than this are not checked.",
)
@click.option(
    "--spec-draft-p-min",
    "--draft-p-min",
    "draft_p_min",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="The draft stops guessing before a token it gives a lower probability (among its ten likeliest).",
)
@click.option(
    "--rpc-worker",
    is_flag=True,
    help="Serve this machine's best device to a head on another machine (ggml's RPC backend) on --host and --port "
    "[default port: 50052]; needs no model, so the bare stub does it too.",
)
@click.option(
    "--rpc-mem",
    type=click.IntRange(min=1),
    metavar="MiB",
    help="With --rpc-worker: offer heads at most this much of the device's memory [default: all that is free].",
)
@click.option(
    "--rpc",
    metavar="HOST:PORT[,HOST:PORT...]",
    help="Spread the model's layers over these --rpc-worker machines and this one's GPUs by their free memory, as "
    "llama-server's --rpc; what does not fit stays on this CPU.",
)
@click.option(
    "-ts",
    "--tensor-split",
    metavar="N0,N1,...",
    help="How the layers are shared among the devices: the --rpc workers in order, then this machine's GPUs (--info "
    "lists them), e.g. 3,1 [default: in proportion to their free memory].",
)
@click.option(
    "--rpc-allow-remote",
    is_flag=True,
    help="Let --rpc-worker listen on an address other machines reach: ggml RPC has no authentication, so only on a "
    "trusted network or through an SSH tunnel or WireGuard.",
)
@click.option("-p", "--prompt", help="Print a completion of PROMPT to stdout and exit (a chat turn if the model has a chat template).")
@click.option(
    "--chat",
    is_flag=True,
    help="Chat with the model in this terminal instead of serving it; with piped input (echo QUESTION | ... --chat), answer it and exit. "
    "Without --chat the runtime serves, and on a machine without a display it says so and suggests --chat.",
)
@click.option(
    "--info",
    is_flag=True,
    help="Print the bundle's manifest, the CPU features and kernels in use, and where the runtime is unpacked, then exit.",
)
@click.option("--license", "show_license", is_flag=True, help="Print the model's licence as the bundle records it, then exit.")
@click.option("--verify", is_flag=True, help="Check the embedded model's SHA-256 before starting.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on; if it is taken and not given here, the next free one.")
@click.option(
    "--ollama-port",
    type=click.IntRange(1, 65535),
    help="Also serve every API on this port; 11434 makes unmodified Ollama clients find the model.",
)
@click.option(
    "--api-key",
    "api_key",
    multiple=True,
    callback=_keys,
    envvar="LLAMABOX_API_KEY",
    help="Require this key on every API route (Authorization: Bearer KEY or x-api-key); several: comma-separated or repeated "
    "[env LLAMABOX_API_KEY].",
)
@click.option(
    "--api-key-file",
    type=click.File("r", encoding="utf-8-sig"),  # a file saved by Notepad starts with a BOM
    help="Also accept the keys in this file, one a line (lines starting with # are comments), as llama-server's.",
)
@click.option("--ssl-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Serve HTTPS with this PEM private key (with --ssl-cert-file).")
@click.option("--ssl-cert-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Serve HTTPS with this PEM certificate (with --ssl-key-file).")
@click.option(
    "-a",
    "--alias",
    help="The model's name in the APIs' answers and /v1/models; comma-separated names are all accepted, the first is the id "
    "[default: the model's own name].",
)
@click.option("--slots/--no-slots", default=True, show_default=True, help="Answer GET /slots (llama-server's slot monitoring).")
@click.option(
    "--slot-save-path",
    type=click.Path(exists=True, file_okay=False, writable=True, path_type=Path),
    help="Let clients save a slot's cache to a file in this folder and restore it (POST /slots/ID?action=save|restore|erase), "
    "as llama-server's.",
)
@click.option("--props", is_flag=True, help="Let clients POST /props, as llama-server's --props (no property can be changed there yet).")
@click.option(
    "--webui/--no-webui",
    "--ui/--no-ui",
    "webui",
    default=True,
    show_default=True,
    help="Serve the chat page at / (--no-webui: the APIs alone, and no browser is opened).",
)
@click.option(
    "-cb",
    "--cont-batching",
    is_flag=True,
    help="Continuous batching, as llama-server's -cb: always on here (requests join and leave the batch at every step).",
)
@click.option(
    "-nocb",
    "--no-cont-batching",
    is_flag=True,
    hidden=True,
    expose_value=False,
    callback=_refused("llamabox always batches requests continuously and cannot turn it off; leave it out"),
)
@click.option(
    "-to",
    "--timeout",
    type=int,
    hidden=True,
    expose_value=False,
    callback=_refused(
        "llamabox's server has no read or write timeout to set: a client that goes away is noticed at once and its "
        "request stopped, and a long generation is never cut; leave it out"
    ),
)
@click.option(
    "--context-shift/--no-context-shift",
    default=False,
    show_default=True,
    help="When a reply fills its context, drop the oldest half of it after the first --keep tokens and go on, as "
    "llama-server's (the answer says how many tokens were dropped); without it the reply ends with finish_reason length.",
)
@click.option(
    "--lora",
    multiple=True,
    metavar="FILE[,FILE]",
    callback=_lora_files,
    help="Apply this LoRA adapter (a GGUF made for this model) at scale 1; repeatable. GET/POST /lora-adapters show and "
    "change the scales, and a request's lora field sets its own, as llama-server's.",
)
@click.option("--lora-scaled", multiple=True, metavar="FILE:SCALE[,...]", callback=_lora_files, help="Apply this LoRA adapter at SCALE.")
@click.option(
    "--lora-init-without-apply",
    is_flag=True,
    help="Load the LoRA adapters at scale 0 (apply them later with POST /lora-adapters or a request's lora field).",
)
@click.option(
    "--truncate-prompt",
    is_flag=True,
    help="A chat that leaves less than a quarter of the context for the reply loses its oldest turns (never its system "
    "message nor its newest turn) instead of being refused; the answer says how many messages were left out.",
)
@click.option(
    "--keep",
    "n_keep",
    default=0,
    show_default=True,
    type=click.IntRange(-1),
    help="Prompt tokens a context shift keeps, after the BOS token (-1: the whole prompt); a request's n_keep goes over it.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Accept requests for this host name too (repeatable); by default only IP addresses and localhost, against DNS rebinding.",
)
@click.option("--cors", "cors_origins", multiple=True, help="Let web pages from this origin call the API (repeatable; * for any) [default: pages from localhost, 127.0.0.1 and [::1] only, as llama-server].")
@click.option(
    "-c",
    "--ctx-size",
    type=click.IntRange(0),
    help="Tokens of context, one cache shared by the --parallel requests: any one may use all of it (0: the model's own) "
    "[default: the model's own, cut to what a quarter of the free memory holds, not below 4096, as llama-server's --fit].",
)
@click.option(
    "--ctx-per-slot",
    is_flag=True,
    help="Give each of the --parallel requests its own --ctx-size tokens of cache instead of one shared cache "
    "(each user is sure of a share; the cache's memory grows with --parallel).",
)
@click.option(
    "-ctk",
    "--cache-type-k",
    type=click.Choice(CACHE_TYPES),
    default="f16",
    show_default=True,
    help="The type of the cache's keys, as llama-server: q8_0 takes about half the memory of f16, so twice the context or slots.",
)
@click.option(
    "-ctv",
    "--cache-type-v",
    type=click.Choice(CACHE_TYPES),
    default="f16",
    show_default=True,
    help="The type of the cache's values (quantized ones need flash attention, which llama.cpp turns on where it can).",
)
@click.option(
    "-fa",
    "--flash-attn",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Flash attention, as llama-server's -fa. auto: on where the GPU holds every layer (or a quantized -ctv needs it), "
    "off on the CPU, where it slows decoding in long chats.",
)
@click.option(
    "-np",
    "--parallel",
    type=click.IntRange(1, 64),
    help="Requests served at once, decoded together in the shared cache (as llama-server's -np). More requests wait in "
    "line. -p uses one. [default: 4; with --ctx-per-slot, fewer if their caches would take more than a quarter of the "
    "memory free at start]",
)
@click.option(
    "--queue",
    "max_waiting",
    default=64,
    show_default=True,
    type=click.IntRange(0),
    help="Requests that may wait for a free slot; beyond that the server answers 503 with Retry-After.",
)
@click.option("-t", "--threads", type=click.IntRange(1), help="CPU threads for generation [default: every core].")
@click.option("-tb", "--threads-batch", type=click.IntRange(1), help="CPU threads for reading prompts [default: --threads].")
@click.option(
    "-b", "--batch-size", default=2048, show_default=True, type=click.IntRange(1), help="Tokens llama.cpp takes in one decode call at most."
)
@click.option(
    "-ub",
    "--ubatch-size",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Tokens per compute step (at most --batch-size); a prompt read while others generate takes this many per step.",
)
@click.option(
    "-lm",
    "--load-mode",
    type=click.Choice(["auto", "none", "mmap", "mlock", "mmap+mlock", "dio"]),
    help="How the weights are read, as llama-server's: auto (mapped in place, unless a device cannot), none (read into "
    "memory), mmap, mlock (read and locked in memory), mmap+mlock [default: auto]; dio is refused (direct I/O needs a path).",
)
@click.option("--mlock", is_flag=True, help="Keep the weights in memory, never swapped out (llama-server's older spelling of -lm mmap+mlock).")
@click.option("--no-mmap", is_flag=True, help="Read the weights into memory rather than map them (older spelling of -lm none).")
@click.option(
    "--numa",
    type=click.Choice(["distribute", "isolate", "numactl"]),
    help="NUMA placement of the CPU threads, as llama.cpp's: spread over every node, keep to the starting node, or follow numactl.",
)
@click.option(
    "--offline",
    is_flag=True,
    help="Never use the network: always so for a bundle and a local -m, which is all the runtime runs (accepted for llama-server's scripts).",
)
@click.option("--temp", "temperature", default=0.8, show_default=True, type=click.FloatRange(0), help="Default sampling temperature (0: greedy).")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(0), help="Default top-k sampling (0: off).")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1), help="Default top-p (nucleus) sampling (1: off).")
@click.option("--min-p", default=0.05, show_default=True, type=click.FloatRange(0, 1), help="Default min-p sampling (0: off).")
@click.option("--repeat-penalty", default=1.0, show_default=True, type=click.FloatRange(0), help="Default penalty for repeated tokens (1: off).")
@click.option("--seed", default=-1, show_default=True, type=int, help="Default random seed (-1: a new one per request).")
@click.option("-n", "--n-predict", default=-1, show_default=True, type=int, help="Default maximum tokens to generate (-1: until the context is full).")
@click.option("--system-prompt", help="System message prepended to every chat that has none.")
@click.option(
    "--chat-template",
    metavar="NAME|FILE|TEMPLATE",
    help="The chat template instead of the model's own: one of llama.cpp's built-in ones by name (chatml, llama3, "
    "mistral-v7, ...), a Jinja file, or Jinja text, as llama-server's.",
)
@click.option(
    "--jinja/--no-jinja",
    default=True,
    show_default=True,
    help="Render chat templates with Jinja (tools, chat_template_kwargs); --no-jinja uses llama.cpp's built-in template "
    "that matches the model's.",
)
@click.option(
    "--reasoning-format",
    type=click.Choice(["auto", "none", "deepseek", "deepseek-legacy"]),
    default="auto",
    show_default=True,
    help="Where a chat reply's reasoning (<think>...</think>) goes, as llama-server's: auto and deepseek put it in "
    "message.reasoning_content, deepseek-legacy there and in content, none leaves it in content; a request's "
    "reasoning_format goes over it.",
)
@click.option(
    "-rea",
    "--reasoning",
    type=click.Choice(["on", "off", "auto"]),
    default="auto",
    show_default=True,
    help="Let a reasoning model think before it answers (its template's enable_thinking), as llama-server's; auto: "
    "as its template decides.",
)
@click.option(
    "--reasoning-budget",
    default=-1,
    show_default=True,
    type=click.IntRange(-1),
    help="Tokens a chat reply may think (<think>...) before its reasoning is closed for it and it answers, as "
    "llama-server's: 0 closes it at once, -1 sets no limit.",
)
@click.option(
    "--chat-template-kwargs",
    "chat_template_kwargs",
    metavar="JSON",
    callback=_json_object,
    help='More variables for every chat\'s template, as a JSON object (e.g. \'{"enable_thinking": false}\'); a request\'s '
    "chat_template_kwargs go over them.",
)
@click.option(
    "--cpu-variant",
    envvar="LLAMABOX_CPU_VARIANT",
    help="Force one set of CPU kernels, e.g. x64 (portable) or haswell [default: the best this CPU runs; env LLAMABOX_CPU_VARIANT].",
)
@click.option(
    "--gpu",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="auto: put the model on the GPU when the runtime carries a backend for it (Vulkan, CUDA, Metal) and the GPU passes "
    "its self-test; off: the CPU alone.",
)
@click.option(
    "-ngl",
    "--gpu-layers",
    type=_LAYERS,
    default="auto",
    show_default=True,
    help="Layers of the model on the GPU: auto puts every layer there when they, the cache and a 1 GiB margin fit its free "
    "memory (with a shorter default context first, not below 4096 tokens, as llama-server's --fit), else as many as fit; N puts N there (0: none).",
)
@click.option("--gpu-device", help="Use only this GPU, by its name in --info (Vulkan0, CUDA1) [default: every GPU of the best backend].")
@click.option("--nobrowser", is_flag=True, help="Do not open the chat page in a browser.")
@click.option(
    "--reranking",
    "--rerank",
    is_flag=True,
    help="Answer /rerank with this model's ranking head, as llama-server's (a reranker the bundle carries answers it without this).",
)
@click.option("--metrics", is_flag=True, help="Serve Prometheus metrics at GET /metrics, with llama-server's names (llamacpp:...).")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's own log and one line per HTTP request.")
@click.version_option(__version__, prog_name="llamabox runtime")
@click.pass_context
def run(ctx: click.Context, **options: object) -> None:
    """Run the model in this file: a chat in the browser and the OpenAI, Anthropic, llama.cpp and Ollama APIs on localhost.

    \b
    Examples:
      ./model.run                          # serve on http://127.0.0.1:8080 and open the chat
      ./model.run -p "Why is the sky blue?" --temp 0
      ./model.run --chat                   # chat in this terminal
      ./model.run --nobrowser --port 9000  # API only
      ./model.run --info                   # what is inside, which CPU kernels load
      ./model.run -m other.gguf            # another model, same runtime

    On Linux and macOS the first start unpacks the runtime (not the model) once into ~/.cache/llamabox/runtime, or
    $LLAMABOX_CACHE/runtime; every later start runs it from there.
    """
    from runtime import model_source, modes

    if options.pop("show_license"):
        click.echo(model_source.licence_text(model_source.resolve(options["model"], ctx.obj["own"])))  # type: ignore[arg-type]
        return
    explicit_port = ctx.get_parameter_source("port") is not click.core.ParameterSource.DEFAULT
    modes.dispatch(ctx.obj["own"], ctx.obj["started"], modes.RunOptions(explicit_port=explicit_port, **options))  # type: ignore[arg-type]


def check_args(args: list[str]) -> str | None:
    """Why `args` would not parse as runtime arguments, or None if they would."""
    try:
        with run.make_context("runtime", list(args), resilient_parsing=False) as ctx:
            del ctx
    except click.exceptions.Exit:
        return "--help and --version cannot be baked in"
    except click.ClickException as exc:
        return exc.format_message()
    return None


def merged_args(baked: list[str], given: list[str]) -> list[str]:
    """The bundle's baked arguments, then the user's, which win: click lets a later value of an option replace an
    earlier one, but a repeatable option (--api-key, --lora, --cors, ...) would add up, so the baked values of one the
    user gives are dropped (a key rotated at run time must not leave the baked one valid)."""
    repeatable = [param for param in run.params if isinstance(param, click.Option) and param.multiple]

    def names(param: click.Option) -> list[str]:
        return [*param.opts, *param.secondary_opts]

    given_names = {arg.split("=", 1)[0] for arg in given if arg.startswith("-")}
    replaced = [param for param in repeatable if given_names & set(names(param))]
    kept, skip = [], False
    for arg in baked:
        if skip:
            skip = False
            continue
        param = next((p for p in replaced if arg.split("=", 1)[0] in names(p)), None)
        if param is None:
            kept.append(arg)
        else:
            skip = "=" not in arg  # its value is the next argument
    return [*kept, *given]


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    own: OwnBundle = own_bundle()
    args = merged_args(own.default_args, sys.argv[1:] if argv is None else argv)
    own_file = packaged.own_file()
    prog = own_file.name if own_file is not None else "python -m runtime"
    run.main(args=args, prog_name=prog, obj={"own": own, "started": started})
