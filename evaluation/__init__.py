"""evaluation: `alignserve eval`, the offline evaluation harness for alignment strategies.

Owns the evaluation plan (which strategy runs with which n), the two runners that produce one
answer per (prompt, setting) behind one small interface (in-process on the vLLM engine, or over
HTTP against a running alignserve server), the pure aggregation of answers into per-strategy
numbers (harmless ratio, mean reward and cost, KL, compute, win rate against the base policy),
and the report (results.json, report.md, PNG plots).

Data flow: prompts.jsonl → plan of `Setting`s → runner → `Row` per (prompt, setting) →
`metrics.summarize_setting` → `report.write_report`.

`metrics` imports neither vllm nor fastapi, so the numbers are unit-tested against hand-computed
values; the strategies come from `decoding.strategies.STRATEGIES`, never from a list of names here.
"""
