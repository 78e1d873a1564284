"""The seeds' Engine examples, run as plain scripts with only the import (and the model)
changed, plus the event-loop situations users hit: inside a running loop, repeated
``asyncio.run``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from radixfleet.engine.engine import Engine

ENGINE_DOC_EXAMPLES = '''
from radixfleet import Engine

engine = Engine(model_path="smollm2", max_total_tokens=4096)

response = engine.generate(
    prompt="What is the capital of France?",
    sampling_params={"temperature": 0.0, "max_new_tokens": 32}
)

print("BASIC", repr(response["text"]), response["meta_info"]["finish_reason"])

# Token IDs Input
tokenizer = engine.tokenizer_manager.tokenizer
prompts = ["Hello", "How are you?"]
input_ids = [tokenizer.encode(p) for p in prompts]
outputs = engine.generate(
    input_ids=input_ids,
    sampling_params={"max_new_tokens": 50}
)
print("INPUT_IDS", len(outputs), all("text" in o for o in outputs))

response = engine.generate(
    prompt="Write a short story",
    sampling_params={"temperature": 0.8, "max_new_tokens": 64},
    stream=True
)

chunks = 0
for chunk in response:
    print(chunk["text"], end="", flush=True)
    chunks += 1
print()
print("STREAM_CHUNKS", chunks)

prompts = [
    "What is AI?",
    "Explain quantum computing",
    "What is machine learning?"
]

responses = engine.generate(
    prompt=prompts,
    sampling_params={"temperature": 0.7, "max_new_tokens": 100}
)

for response in responses:
    print("BATCH", response["text"][:20].replace("\\n", " "))

engine.shutdown()

with Engine(model_path="smollm2", max_total_tokens=4096) as engine:
    response = engine.generate(prompt="Hello", sampling_params={"max_new_tokens": 8})
    print("WITH", response["meta_info"]["completion_tokens"])
'''

OFFLINE_DOC_EXAMPLES = '''
import asyncio

from radixfleet import Engine as _Engine

class sgl:  # the only change besides the import: `sgl.Engine` names our Engine
    Engine = _Engine

llm = sgl.Engine(model_path="smollm2", max_total_tokens=4096)

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]

sampling_params = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 24}

outputs = llm.generate(prompts, sampling_params)
for prompt, output in zip(prompts, outputs):
    print("===============================")
    print(f"Prompt: {prompt}\\nGenerated text: {output['text']}")
print("SYNC", len(outputs))


async def main():
    outputs = await llm.async_generate(prompts, sampling_params)
    for prompt, output in zip(prompts, outputs):
        print(f"\\nPrompt: {prompt}")
        print(f"Generated text: {output['text']}")
    print("ASYNC", len(outputs))


asyncio.run(main())


async def main_stream():
    for prompt in prompts:
        print(f"\\nPrompt: {prompt}")
        print("Generated text: ", end="", flush=True)
        n = 0
        async for chunk in await llm.async_generate(prompt, sampling_params, stream=True):
            print(chunk["text"], end="", flush=True)
            n += 1
        print()
        print("ASYNC_STREAM", n > 1)


asyncio.run(main_stream())
llm.shutdown()
'''


def run_script(code: str, tmp_path) -> str:
    path = tmp_path / "example.py"
    path.write_text(textwrap.dedent(code))
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_engine_doc_examples_run_as_a_plain_script(model_dir, tmp_path):
    out = run_script(ENGINE_DOC_EXAMPLES, tmp_path)
    # Without a chat template the instruct model ends at once (HF greedy gives EOS too).
    assert "BASIC '' {'type': 'stop', 'matched': 2}" in out
    assert "INPUT_IDS 2 True" in out
    assert int(out.split("STREAM_CHUNKS ")[1].split()[0]) > 1
    assert out.count("BATCH ") == 3
    assert "WITH 8" in out


def test_offline_engine_doc_examples_run_as_a_plain_script(model_dir, tmp_path):
    out = run_script(OFFLINE_DOC_EXAMPLES, tmp_path)
    assert "SYNC 4" in out and "ASYNC 4" in out
    assert out.count("ASYNC_STREAM True") == 4


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=4096) as e:
        yield e


GREEDY = {"temperature": 0, "max_new_tokens": 12}


def test_sync_generate_works_inside_a_running_event_loop(engine):
    expected = engine.generate("The capital of France is", GREEDY)["text"]

    async def notebook_cell():
        # Jupyter runs cells inside a loop; no nest_asyncio needed.
        sync = engine.generate("The capital of France is", GREEDY)["text"]
        awaited = (await engine.async_generate("The capital of France is", GREEDY))["text"]
        return sync, awaited

    assert asyncio.run(notebook_cell()) == (expected, expected)


def test_repeated_asyncio_run_calls(engine):
    async def once():
        return (await engine.async_generate(["Hi", "Bye"], GREEDY))

    first = asyncio.run(once())
    assert len(first) == 2 and all(o["text"] for o in first)
    for _ in range(3):
        again = asyncio.run(once())
        assert [o["text"] for o in again] == [o["text"] for o in first]


def test_stream_concatenates_to_the_non_streaming_text(engine):
    full = engine.generate("Once upon a time", {"temperature": 0, "max_new_tokens": 40})
    chunks = list(engine.generate("Once upon a time", {"temperature": 0, "max_new_tokens": 40}, stream=True))
    assert len(chunks) > 1
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]


def test_tokenizer_is_exposed(engine):
    tok = engine.tokenizer_manager.tokenizer
    ids = tok.encode("The capital of France is")
    by_ids = engine.generate(input_ids=ids, sampling_params=GREEDY)
    by_text = engine.generate("The capital of France is", GREEDY)
    assert by_ids["output_ids"] == by_text["output_ids"]


def test_stop_string_is_not_in_the_text_and_is_reported(engine):
    out = engine.generate("Count: 1, 2, 3,", {"temperature": 0, "max_new_tokens": 30, "stop": " 6"})
    assert " 6" not in out["text"] and out["text"].startswith(" 4, 5")
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 6"}
    chunks = list(engine.generate("Count: 1, 2, 3,", {"temperature": 0, "max_new_tokens": 30, "stop": " 6"},
                                  stream=True))
    assert "".join(c["text"] for c in chunks) == out["text"]
