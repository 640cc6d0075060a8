"""Token latency of `tpi generate --transport inproc` against transformers' own generate()
on SmolLM2, same dtype, same prompt, greedy, alternating runs; prints medians and the ratio.

    python bench/inproc_vs_hf.py --devices 4 --dtype float32 --tokens 48 --rounds 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

from tpi.host import prefer_passive_wait

prefer_passive_wait()  # as the tpi command does, before torch loads (applies to both systems)
import torch  # noqa: E402


def hf_token_latency(model, prompt: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    total = time.perf_counter() - t
    return (total - first) / (tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from tpi.dtypes import FLOAT_DTYPES
    from tpi.settings import RuntimeOptions
    from tpi.engine import build_inproc_engine
    from tpi.settings import ModelSettings
    from tpi.model.sampling import SamplingParams
    from tpi.weights.sources import resolve_model

    model_dir = resolve_model("smollm2")
    dtype = FLOAT_DTYPES[args.dtype]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    engine = build_inproc_engine(ModelSettings(str(model_dir), [1.0] * args.devices), RuntimeOptions(dtype=args.dtype, max_seq=512))
    engine.generator.stop_ids = set()
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the history of Paris."}])
    params = SamplingParams(max_new_tokens=args.tokens)
    hf_runs, tpi_runs = [], []
    with torch.no_grad():
        hf_token_latency(hf, prompt, 4)  # warm-up both
        engine.generator.generate(prompt, SamplingParams(max_new_tokens=4))
        for _ in range(args.rounds):
            hf_runs.append(hf_token_latency(hf, prompt, args.tokens))
            tpi_runs.append(engine.generator.generate(prompt, params).token_latency_s)
    engine.close()
    hf_med, tpi_med = statistics.median(hf_runs), statistics.median(tpi_runs)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"SmolLM2-135M {args.dtype}, prompt {len(prompt)} tokens, {args.tokens} new tokens, {args.rounds} rounds")
    print(f"transformers generate(): median {hf_med * 1e3:.1f} ms/token  runs {[round(x * 1e3, 1) for x in hf_runs]}")
    print(f"tpi inproc, {args.devices} devices: median {tpi_med * 1e3:.1f} ms/token  runs {[round(x * 1e3, 1) for x in tpi_runs]}")
    print(f"ratio tpi/transformers: {tpi_med / hf_med:.2f}x")


if __name__ == "__main__":
    main()
