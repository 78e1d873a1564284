"""The HTTP server's metric registry: exactly the catalog's families, observed from
TokenizerManager listener calls."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from radixfleet.engine.server.metric_names import ENGINE_METRICS
from radixfleet.engine.server.metrics import EngineMetrics


@dataclass
class State:
    rid: str
    arrival: float


def samples(metrics: EngineMetrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_registers_exactly_the_catalog():
    m = EngineMetrics("m")
    names = {fam.name for fam in text_string_to_metric_families(m.exposition().decode())}
    # the text parser strips _total from counter family names
    expected = {f.name.removesuffix("_total") if f.kind == "counter" else f.name for f in ENGINE_METRICS}
    assert names == expected


def test_listener_counts_tokens_latencies_and_finish_reasons():
    m = EngineMetrics("m")
    st = State("r1", 0.0)
    m.on_output(st, [5], None, {})
    m.on_output(st, [6], None, {})
    m.on_output(st, [7], {"type": "stop", "matched": 2},
                {"prompt_tokens": 10, "cached_tokens": 4, "e2e_latency": 1.5, "queue_time": 0.25})
    m.on_output(State("HEALTH_CHECK_x", 0.0), [1], {"type": "length"}, {"prompt_tokens": 1})  # not counted
    m.set_internal_state({"num_running_requests": 3, "kv_cache_usage_ratio": 0.5, "generation_throughput": 7.0})
    s = samples(m)
    lab = (("model_name", "m"),)
    assert s[("radixfleet_engine_generation_tokens_total", lab)] == 3
    assert s[("radixfleet_engine_prompt_tokens_total", lab)] == 10
    assert s[("radixfleet_engine_cached_prompt_tokens_total", lab)] == 4
    assert s[("radixfleet_engine_requests_total", (("finish_reason", "stop"), ("model_name", "m")))] == 1
    assert s[("radixfleet_engine_time_to_first_token_seconds_count", lab)] == 1
    assert s[("radixfleet_engine_inter_token_latency_seconds_count", lab)] == 2
    assert s[("radixfleet_engine_e2e_request_latency_seconds_sum", lab)] == 1.5
    assert s[("radixfleet_engine_queue_time_seconds_sum", lab)] == 0.25
    assert s[("radixfleet_engine_num_running_requests", lab)] == 3
    assert s[("radixfleet_engine_generation_throughput_tokens_per_second", lab)] == 7
    assert not m._last_token  # per-request state is dropped at finish
