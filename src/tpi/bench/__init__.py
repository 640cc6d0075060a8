"""Benchmarks of the whole system (`tpi bench ...`): an emulated edge testbed (containers or
local processes), Hugging Face baselines, physical bounds, and the report docs/benchmarks.md.

    testbed.py    run clusters over a sweep of configurations, one results JSON per run
    baselines.py  transformers (whole model) on the same model, prompt and token count
    bounds.py     latency/compute/memory/disk bounds and the planner's prediction per run
    machine.py    facts about the (shared, noisy) machine recorded with every result
    report.py     docs/benchmarks.md and its plots from bench/results/*.json, one section per model
    results.py    the results read, their bounds recomputed, repeats grouped into rows
    tables.py     the Markdown tables of those rows
    findings.py   the discussion, computed from those rows
    plots.py      the figures of those rows
    other_benchmarks.py  the 70B memory results and the other benchmark pages, folded in
    cgroup.py     a memory-limited cgroup (v1) for benchmark processes outside containers
    cli.py        the `tpi bench` argument parser

Heavy optional parts (docker, transformers, matplotlib) are imported only when used.
"""
