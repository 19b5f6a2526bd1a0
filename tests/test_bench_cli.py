"""``tokenwire bench`` against the real embedded server: JSON results and a valid PNG plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tokenwire.cli.bench import RequestResult

from .conftest import RunningServer
from .llama_peer import llama_cpp_server

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench(server: RunningServer | str, tmp_path: Path, *args: str) -> tuple[dict[str, Any], Path]:
    url = server if isinstance(server, str) else server.url
    output, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenwire.cli.main",
            "bench",
            "--base-url",
            url,
            "--num-prompts",
            "3",
            "--max-tokens",
            "8",
            "--output",
            str(output),
            "--plot",
            str(plot),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr
    assert "TTFT" in result.stderr  # the summary table
    return json.loads(output.read_text()), plot


def check_level(level: dict[str, Any], requests: int) -> None:
    assert level["completed"] == requests and level["failed"] == 0
    assert 0 < level["total_output_tokens"] <= 8 * requests, level
    assert level["request_throughput"] > 0 and level["output_throughput"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = level[name]
        assert stats["p50"] is not None, name
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (name, stats)
    # A request's first token comes before its end.
    assert level["ttft_ms"]["p50"] <= level["e2el_ms"]["p50"]


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # a drawn chart, not an empty canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1100, 750)
        # Something was drawn: many distinct colours, not a blank figure.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20


@pytest.mark.timeout(240)
def test_concurrency_sweep_writes_json_and_png(server: RunningServer, tmp_path: Path) -> None:
    results, plot = bench(
        server, tmp_path, "--concurrency", "1,2", "--goodput", "ttft:0.001", "e2el:600000"
    )
    assert results["mode"] == "concurrency" and results["protocol"] == "openai"
    assert [level["concurrency"] for level in results["levels"]] == [1, 2]
    for level in results["levels"]:
        check_level(level, 3)
        # Nobody gets a first token within a microsecond: goodput is zero, not throughput.
        assert level["good_requests"] == 0 and level["goodput"] == 0
    check_png(plot)


@pytest.mark.timeout(240)
def test_poisson_rate_sweep(server: RunningServer, tmp_path: Path) -> None:
    results, plot = bench(
        server,
        tmp_path,
        "--request-rate",
        "4,inf",
        "--max-concurrency",
        "2",
        "--goodput",
        "ttft:600000",
        "--percentiles",
        "50,90,99",
    )
    assert results["mode"] == "request_rate"
    assert [level["load_label"] for level in results["levels"]] == ["4", "inf"]
    for level in results["levels"]:
        check_level(level, 3)
        assert level["good_requests"] == 3  # a generous SLO: every request is good
    check_png(plot)


@pytest.mark.timeout(240)
def test_any_openai_compatible_server(tmp_path: Path) -> None:
    """A foreign server without usage chunks: tokens are counted as content chunks."""
    with llama_cpp_server() as url:
        results, plot = bench(url, tmp_path, "--concurrency", "1,2")
    for level in results["levels"]:
        check_level(level, 3)
        assert level["total_input_tokens"] == 0  # no usage reported
    check_png(plot)


@pytest.mark.parametrize(
    "args",
    [["--concurrency", "0"], ["--concurrency", "1.5"], ["--goodput", "latency:5"]],
)
def test_bad_arguments_are_clear_errors(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenwire.cli.main", "bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "error" in result.stderr and "Traceback" not in result.stderr


def test_tpot_and_slos_follow_vllm() -> None:
    request = RequestResult(ok=True, output_tokens=11, ttft=0.5, e2e=1.5, itl=[0.1] * 10)
    assert request.tpot == pytest.approx(0.1)
    assert request.meets({"ttft": 600, "tpot": 150, "e2el": 2000})
    assert not request.meets({"ttft": 400})
    assert not request.meets({"tpot": 50})
    one_token = RequestResult(ok=True, output_tokens=1, ttft=0.2, e2e=0.2)
    assert one_token.tpot is None and one_token.meets({"tpot": 1})
