"""The memory benchmark's model: a random-weight Llama-2-7B shape truncated to 8 layers,
written layer by layer (`bench/memory.py make-model`), then split into the shard stores the
matrix runs (`bench/memory.py split`), each split in a cgroup with its peak recorded."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from memory_run import child_env, cold_start, wait_all
from tpi.bench.cgroup import Cgroup

LLAMA2_7B_8L = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
)
PROMPT = [1] + [(7919 * i) % 31000 + 500 for i in range(1, 32)]   # 32 token ids < vocab


def make_model(out: Path, seed: int = 0) -> None:
    """Random-weight Llama-2-7B shape, 8 layers, bfloat16, one safetensors file per layer
    (written tensor by tensor: never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    c = LLAMA2_7B_8L
    H, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    files, weight_map = [], {}
    parts = [("head", {"model.embed_tokens.weight": lambda: rand(V, H), "model.norm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
                       "lm_head.weight": lambda: rand(V, H)})]
    for i in range(L):
        p = f"model.layers.{i}."
        parts.append((f"layer{i}", {
            p + "input_layernorm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
            **{p + f"self_attn.{n}_proj.weight": (lambda: rand(H, H)) for n in "qkvo"},
            p + "mlp.gate_proj.weight": lambda: rand(I, H), p + "mlp.up_proj.weight": lambda: rand(I, H),
            p + "mlp.down_proj.weight": lambda: rand(H, I),
        }))
    for k, (_, tensors) in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({name: make() for name, make in tensors.items()}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        files.append(fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(c, indent=1))
    # A tokenizer for tpi's engine (the benchmark feeds token ids; the text is not read).
    from tpi.weights.sources import resolve_model

    smol = resolve_model("smollm2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((smol / f).read_bytes())
    print(f"wrote {out}: {sum((out / f).stat().st_size for f in files) / 1e9:.2f} GB in {len(files)} files")


def cmd_split(args) -> None:
    """Split the model into the stores the matrix uses, each in a cgroup, recording peaks."""
    from tpi.weights.budget import parse_size
    from tpi.weights.slicing import DEFAULT_MAX_BLOCK_BYTES

    max_block = parse_size(args.max_block_size) if args.max_block_size else DEFAULT_MAX_BLOCK_BYTES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for dtype in args.dtypes.split(","):
        cold_start()
        cg = Cgroup("tpi-bench-split", parse_size(args.limit))
        code = ("import json,sys,time; from tpi.engine import prepare_store; from tpi.host import peak_rss_bytes;"
                f"t=time.time(); prepare_store({args.model!r}, [1.0]*{args.world}, {dtype!r}, {str(out / dtype)!r}, "
                f"max_block_bytes={max_block});"
                "print(json.dumps({'seconds': time.time()-t, 'peak_rss': peak_rss_bytes()}))")
        log = out / f"split-{dtype}.log"
        proc = cg.spawn([sys.executable, "-c", code], log, child_env())
        rc = wait_all([proc], 3600)[0]
        last = log.read_text().strip().splitlines()[-1] if log.read_text().strip() else "{}"
        rec = {"dtype": dtype, "max_block_bytes": max_block, "exit_code": rc, "cgroup_limit": parse_size(args.limit),
               "cgroup_peak": cg.peak(),
               **(json.loads(last) if last.startswith("{") else {"error": last})}
        cg.remove()
        records.append(rec)
        print(json.dumps(rec), flush=True)
    (out / "split-results.json").write_text(json.dumps(records, indent=1))
