"""Chat templates chosen as llama-server chooses them (--chat-template, --no-jinja, chat_template_kwargs), and a
last assistant message continued rather than answered, with the real engine and SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.devices import cpu as backends
from runtime.engine import ChatTemplateError, Engine, EngineOptions, Sampling
from runtime.engine.templates import TemplateChoice
from runtime.model_source import ModelLocation

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)


def engine(smollm2: Path, template: str | None = None, jinja: bool = True, **kwargs: object) -> Engine:
    options = EngineOptions(ctx_size=512, parallel=1, threads=2, template=TemplateChoice(template, jinja), template_kwargs=dict(kwargs))
    return Engine(ModelLocation(smollm2), options)


def test_a_last_assistant_message_is_continued(smollm2: Path) -> None:
    with engine(smollm2) as e:
        messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is"}]
        prompt = e.chat_prompt(messages)
        assert prompt.text.endswith("<|im_start|>assistant\nThe capital of France is")  # no end of turn after it
        assert prompt.text == e.chat_prompt(messages[:1]).text + "The capital of France is"
        assert "Paris" in e.complete(prompt, Sampling(temperature=0, max_tokens=4)).text


def test_built_in_templates_by_name_and_with_no_jinja(smollm2: Path) -> None:
    with engine(smollm2, "llama3") as e:
        assert e.chat_prompt(HI).text == "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        assert e.chat_template == "llama3" and not e.template_knows_tools
    with engine(smollm2, jinja=False) as e:
        # llama.cpp recognises SmolLM2's Jinja template as ChatML; its C++ writer adds no default system message.
        assert e.chat_prompt(HI).text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with engine(smollm2) as e:
        assert e.chat_prompt(HI).text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_a_jinja_file_with_kwargs_from_the_command_line_and_the_request(smollm2: Path, tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if mood %}({{ mood }}){% endif %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    with engine(smollm2, str(template), mood="calm") as e:
        assert e.chat_prompt(HI).text == "[user] Hi\n(calm)[assistant] "
        assert e.chat_prompt(HI, template_kwargs={"mood": "brisk"}).text == "[user] Hi\n(brisk)[assistant] "
        assert e.complete(e.chat_prompt(HI), Sampling(temperature=0, max_tokens=2)).completion_tokens == 2
    with engine(smollm2, "{{ messages[0]['content'] }}!") as e:  # Jinja given as text
        assert e.chat_prompt(HI).text == "Hi!"


@pytest.mark.parametrize(
    ("template", "jinja", "message"),
    [
        ("nonsense", True, "--chat-template nonsense: neither a file, a Jinja template nor a template llama.cpp knows by name (bailing,"),
        ("{% if %}", True, "the chat template is not valid Jinja:"),
        ("{{ x }}", False, "llama.cpp has no built-in chat template like this model's; name one of"),
    ],
)
def test_templates_that_cannot_be_used_are_one_line_errors(smollm2: Path, template: str, jinja: bool, message: str) -> None:
    with pytest.raises(ChatTemplateError) as error:
        engine(smollm2, template, jinja)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
