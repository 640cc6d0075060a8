"""Experiment: does AWQ-style per-input-channel equalization let symmetric per-output-channel
int8 (one scale per row, the `torch._weight_int8pack_mm` format) of all seven projections of
SmolLM2-135M reach the issue's 97% teacher-forced top-1 agreement with bfloat16?

    TPI_CACHE=... nice -n 19 python bench/int8_equalization.py [--threads 1] [--grid 21]

Protocol (as tests/engine/test_quant.py): one prefill of the first 257 tokens of a text,
float32 compute on both sides, top-1 at positions 1..256 compared with the reference; the
reference is the converted checkpoint with every tensor rounded to bfloat16 (= the bfloat16
store). Harness: a float32 Hugging Face LlamaForCausalLM whose weights are replaced in place.
Two evaluation texts (the test's Declaration of Independence, and the Gettysburg Address
followed by the close of Lincoln's Second Inaugural); scales are calibrated on a third text
(the opening of Pride and Prejudice), never on an evaluation text.

Equalization: for a group of projections sharing an input x (q/k/v; gate/up; o; down),
W[:, j] *= s_j and x_j /= s_j, the division folded exactly into the op that makes x:
  q, k, v  <- input_layernorm weight          gate, up <- post_attention_layernorm weight
  o        <- v_proj rows (one scale per kv-head row, shared by the q heads that read it)
  down     <- up_proj rows (down's input is act(gate) * up)
s = mean|x_j| ** alpha (normalised to geometric mean 1), alpha from a grid over [0, 1] per
layer and group, minimising || X W^T - X (Q(W s) / s)^T ||^2 summed over the group's outputs,
X = the group's float32 input on the calibration text (taken from the unquantized model).
Per-row int8 is invariant to scaling a row, so folding into v/up rows costs nothing when v/up
are int8; when the preceding tensor stays bfloat16 (the norms always; v or up when kept) the
fold is kept exact: norm channels get the effective ratio g / bf16(g / s), rows get
power-of-two scales.

Prints one table: agreement per variant on both texts (and pooled over the 512 positions).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
from text_sample import DECLARATION  # noqa: E402

from tpi.tokenizer import ChatTokenizer  # noqa: E402
from tpi.weights.quant import quantize_int8  # noqa: E402
from tpi.weights.sources import resolve_model  # noqa: E402

# Public domain: Abraham Lincoln, the Gettysburg Address (1863, Bliss copy), then the closing
# paragraphs of the Second Inaugural Address (1865).
GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that war. "
    "We have come to dedicate a portion of that field, as a final resting place for those who here "
    "gave their lives that that nation might live. It is altogether fitting and proper that we "
    "should do this.\n\n"
    "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- "
    "this ground. The brave men, living and dead, who struggled here, have consecrated it, far "
    "above our poor power to add or detract. The world will little note, nor long remember what we "
    "say here, but it can never forget what they did here. It is for us the living, rather, to be "
    "dedicated here to the unfinished work which they who fought here have thus far so nobly "
    "advanced. It is rather for us to be here dedicated to the great task remaining before us -- "
    "that from these honored dead we take increased devotion to that cause for which they gave the "
    "last full measure of devotion -- that we here highly resolve that these dead shall not have "
    "died in vain -- that this nation, under God, shall have a new birth of freedom -- and that "
    "government of the people, by the people, for the people, shall not perish from the earth.\n\n"
    "Fondly do we hope, fervently do we pray, that this mighty scourge of war may speedily pass "
    "away. Yet, if God wills that it continue until all the wealth piled by the bondsman's two "
    "hundred and fifty years of unrequited toil shall be sunk, and until every drop of blood drawn "
    "with the lash shall be paid by another drawn with the sword, as was said three thousand years "
    "ago, so still it must be said \"the judgments of the Lord are true and righteous altogether.\"\n\n"
    "With malice toward none, with charity for all, with firmness in the right as God gives us to "
    "see the right, let us strive on to finish the work we are in, to bind up the nation's wounds, "
    "to care for him who shall have borne the battle and for his widow and his orphan, to do all "
    "which may achieve and cherish a just and lasting peace among ourselves and with all nations."
)

# Calibration only (public domain: Jane Austen, Pride and Prejudice, 1813, chapter 1).
CALIBRATION = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\n\n"
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he "
    "is considered the rightful property of some one or other of their daughters.\n\n"
    "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park "
    "is let at last?\"\n\n"
    "Mr. Bennet replied that he had not.\n\n"
    "\"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about "
    "it.\"\n\n"
    "Mr. Bennet made no answer.\n\n"
    "\"Do you not want to know who has taken it?\" cried his wife impatiently.\n\n"
    "\"You want to tell me, and I have no objection to hearing it.\"\n\n"
    "This was invitation enough.\n\n"
    "\"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of "
    "large fortune from the north of England; that he came down on Monday in a chaise and four to "
    "see the place, and was so much delighted with it, that he agreed with Mr. Morris immediately; "
    "that he is to take possession before Michaelmas, and some of his servants are to be in the "
    "house by the end of next week.\"\n\n"
    "\"What is his name?\"\n\n"
    "\"Bingley.\"\n\n"
    "\"Is he married or single?\"\n\n"
    "\"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a "
    "year. What a fine thing for our girls!\"\n\n"
    "\"How so? How can it affect them?\"\n\n"
    "\"My dear Mr. Bennet,\" replied his wife, \"how can you be so tiresome! You must know that I "
    "am thinking of his marrying one of them.\"\n\n"
    "\"Is that his design in settling here?\"\n\n"
    "\"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with "
    "one of them, and therefore you must visit him as soon as he comes.\"\n\n"
    "\"I see no occasion for that. You and the girls may go, or you may send them by themselves, "
    "which perhaps will be still better, for as you are as handsome as any of them, Mr. Bingley "
    "may like you the best of the party.\"\n\n"
    "\"My dear, you flatter me. I certainly have had my share of beauty, but I do not pretend to "
    "be anything extraordinary now. When a woman has five grown-up daughters, she ought to give "
    "over thinking of her own beauty.\"\n\n"
    "\"In such cases, a woman has not often much beauty to think of.\"\n\n"
    "\"But, my dear, you must indeed go and see Mr. Bingley when he comes into the "
    "neighbourhood.\"\n\n"
    "\"It is more than I engage for, I assure you.\"\n\n"
    "\"But consider your daughters. Only think what an establishment it would be for one of them. "
    "Sir William and Lady Lucas are determined to go, merely on that account, for in general, you "
    "know, they visit no newcomers. Indeed you must go, for it will be impossible for us to visit "
    "him if you do not.\"\n\n"
    "\"You are over-scrupulous, surely. I dare say Mr. Bingley will be very glad to see you; and I "
    "will send a few lines by you to assure him of my hearty consent to his marrying whichever he "
    "chooses of the girls; though I must throw in a good word for my little Lizzy.\""
)

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SEQ = 257


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def int8_dq(w: torch.Tensor) -> torch.Tensor:
    """The store's symmetric per-output-channel int8, dequantized (tpi.weights.quant)."""
    p = quantize_int8(w)
    return p["qweight"].float() * p["scale"][:, None]


def linears(layer) -> dict[str, torch.nn.Linear]:
    a, m = layer.self_attn, layer.mlp
    return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
            "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}


class Harness:
    def __init__(self, model_dir: Path):
        from transformers import LlamaForCausalLM
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cfg = self.model.config
        self.rep = cfg.num_attention_heads // cfg.num_key_value_heads   # q heads per kv head
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.fp32 = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.ref = {k: bf16(v) for k, v in self.fp32.items()}          # the bfloat16 store
        self.load(self.ref)
        self.tok = ChatTokenizer(model_dir)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.model.state_dict().items():
                p.copy_(state[k])

    def ids(self, text: str, n: int | None = SEQ) -> torch.Tensor:
        ids = self.tok.encode(text)
        if n is not None:
            if len(ids) < n:
                raise ValueError(f"text has {len(ids)} tokens, need {n}")
            ids = ids[:n]
        return torch.tensor([ids])

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        if dtype != torch.float32:
            self.model.to(dtype)
        try:
            return self.model(ids).logits[0].float()                       # (T, V)
        finally:
            if dtype != torch.float32:
                self.model.to(torch.float32)
                self.load(self.ref)

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per layer, the float32 input of each group: qkv, o, gateup, down -> (N, in)."""
        acts = [dict() for _ in self.model.model.layers]
        hooks = []
        for i, layer in enumerate(self.model.model.layers):
            lin = linears(layer)
            for group, kind in (("qkv", "q"), ("o", "o"), ("gateup", "gate"), ("down", "down")):
                def hook(mod, args, i=i, group=group):
                    acts[i][group] = args[0][0].detach().clone()
                hooks.append(lin[kind].register_forward_pre_hook(hook))
        try:
            self.model(ids)
        finally:
            for h in hooks:
                h.remove()
        return acts


# --- the scale search ---------------------------------------------------------------------

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gateup": ("gate", "up"), "down": ("down",)}


def stat(x: torch.Tensor, group: str, rep: int, head_dim: int) -> torch.Tensor:
    """mean|x_j| per input channel (o: pooled over the q heads sharing a kv head)."""
    m = x.abs().mean(0)                                                    # (in,)
    if group == "o":
        kv = m.view(-1, rep, head_dim).mean(1)                             # (kv_heads, head_dim)
        m = kv.repeat_interleave(rep, dim=0).reshape(-1)                   # (in,) constant per kv row
    return m


def scales(m: torch.Tensor, alpha: float, pow2: bool) -> torch.Tensor:
    s = m.clamp(min=1e-6) ** alpha
    s = s / (s.max() * s.min()).sqrt()
    return torch.exp2(torch.round(torch.log2(s))) if pow2 else s


def group_error(x: torch.Tensor, ws: list[torch.Tensor], s: torch.Tensor, quantized: list[bool]) -> float:
    err = 0.0
    for w, q in zip(ws, quantized):
        if q:
            what = int8_dq(w * s) / s
            err += (x @ (what - w).T).pow(2).sum().item()
    return err


def needs_pow2(group: str, quant: set[str]) -> bool:
    """Power-of-two scales keep a fold exact when it touches a tensor that stays bfloat16: the
    v (o's scales) or up (down's) rows, or a group member kept bfloat16 beside the norm."""
    if group == "o":
        return "v" not in quant
    if group == "down":
        return "up" not in quant
    return not set(GROUPS[group]) <= quant


def search(acts, state, harness, quant: set[str], grid: list[float], pow2_rows: bool, fixed: float | None):
    """Per layer and group, the alpha with the least quantized output error."""
    chosen = []
    for i, a in enumerate(acts):
        pre = f"model.layers.{i}."
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
        row = {}
        for group, kinds in GROUPS.items():
            q = [k in quant for k in kinds]
            if not any(q):
                continue
            ws = [state[pre + names[k] + ".weight"] for k in kinds]
            x = a[group]
            m = stat(x, group, harness.rep, harness.head_dim)
            pow2 = pow2_rows and needs_pow2(group, quant)
            if fixed is not None:
                row[group] = (fixed, None, None)
                continue
            errs = [(group_error(x, ws, scales(m, al, pow2), q), al) for al in grid]
            best = min(errs)
            row[group] = (best[1], best[0], errs[0][0])                    # alpha, its error, alpha=0 error
        chosen.append(row)
    return chosen


def apply(state, harness, quant: set[str], chosen, acts, pow2_rows: bool) -> dict[str, torch.Tensor]:
    """A copy of `state` with the scales folded and the `quant` projections int8 (dequantized)."""
    out = dict(state)
    rep, hd = (harness.rep, harness.head_dim) if harness else (None, None)
    for i, row in enumerate(chosen):
        pre = f"model.layers.{i}."
        W = lambda n: out[pre + n + ".weight"]                               # noqa: E731
        def put(n, t):
            out[pre + n + ".weight"] = t
        for group, (alpha, _, _) in row.items():
            m = stat(acts[i][group], group, rep, hd)
            if group in ("qkv", "gateup"):
                norm = "input_layernorm" if group == "qkv" else "post_attention_layernorm"
                g = W(norm)
                g_new = bf16(g / scales(m, alpha, pow2_rows and needs_pow2(group, quant)))
                s = torch.where(g_new != 0, g / g_new, torch.ones_like(g))   # the exact effective ratio
                put(norm, g_new)
                for k in GROUPS[group]:
                    n = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                         "gate": "mlp.gate_proj", "up": "mlp.up_proj"}[k]
                    put(n, W(n) * s if k in quant else bf16(W(n) * s))
            else:
                prev, n = ("self_attn.v_proj", "self_attn.o_proj") if group == "o" else ("mlp.up_proj", "mlp.down_proj")
                prev_kind = "v" if group == "o" else "up"
                pow2 = pow2_rows and needs_pow2(group, quant)
                s = scales(m, alpha, pow2)                                   # (in of n,)
                rows = s.view(-1, rep, hd)[:, 0, :].reshape(-1) if group == "o" else s   # (out of prev,)
                new_prev = W(prev) / rows[:, None]
                put(prev, new_prev if prev_kind in quant else bf16(new_prev))
                put(n, W(n) * s)
    for i in range(len(chosen)):
        pre = f"model.layers.{i}."
        for k, n in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                     ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                     ("down", "mlp.down_proj")):
            if k in quant:
                out[pre + n + ".weight"] = int8_dq(out[pre + n + ".weight"])
    return out


def rtn(state, layers: int, quant: set[str]) -> dict[str, torch.Tensor]:
    return apply(state, None, quant, [{} for _ in range(layers)], None, False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=int, default=21, help="alpha values in [0, 1]")
    ap.add_argument("--skip-first", type=int, default=0,
                    help="calibration positions left out of the statistics and the error (attention-sink tokens)")
    ap.add_argument("--quick", action="store_true",
                    help="only all-seven and the all-but-k/v/down variants (no per-kind rows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    h = Harness(resolve_model("smollm2"))
    layers = len(h.model.model.layers)
    texts = {"Declaration": h.ids(DECLARATION), "Gettysburg": h.ids(GETTYSBURG)}
    calib = h.ids(CALIBRATION, None)
    ref = {t: h.logits(ids) for t, ids in texts.items()}
    ref_top = {t: r.argmax(-1) for t, r in ref.items()}
    margins = {}
    for t, r in ref.items():
        top2 = r[1:].topk(2, dim=-1).values
        d = top2[:, 0] - top2[:, 1]
        margins[t] = ((d < 0.1).sum().item(), (d < 0.3).sum().item())

    rows: list[tuple[str, dict[str, int], str]] = []

    def measure(label: str, state=None, note: str = "", dtype=torch.float32) -> dict[str, int]:
        if state is not None:
            h.load(state)
        got = {t: (h.logits(ids, dtype).argmax(-1)[1:] == ref_top[t][1:]).sum().item() for t, ids in texts.items()}
        h.load(h.ref)
        rows.append((label, got, note))
        print(f"  {label:52s} " + "  ".join(f"{v / 256:6.1%}" for v in got.values()), flush=True)
        return got

    print(f"SmolLM2-135M, {layers} layers; calibration text {calib.shape[1]} tokens; "
          f"eval texts {', '.join(texts)} ({SEQ} tokens, 256 positions each)", flush=True)
    measure("float32 weights (not bf16-rounded)", h.fp32, "context: reference noise")
    measure("bfloat16 compute (bf16 weights)", None, "context: reference noise", torch.bfloat16)
    measure("RTN int8, all seven", rtn(h.ref, layers, set(KINDS)))
    measure("RTN int8, q k v down bf16 (shipped)", rtn(h.ref, layers, {"o", "gate", "up"}))
    if not args.quick:
        measure("RTN int8, all but down", rtn(h.ref, layers, set(KINDS) - {"down"}))
        measure("RTN int8, all but v", rtn(h.ref, layers, set(KINDS) - {"v"}))

    acts = h.capture(calib)
    if args.skip_first:
        acts = [{g: x[args.skip_first:] for g, x in a.items()} for a in acts]
    grid = [i / (args.grid - 1) for i in range(args.grid)]

    def awq(quant: set[str], label: str, fixed: float | None = None, show_alpha: bool = False):
        chosen = search(acts, h.ref, h, quant, grid, True, fixed)
        note = ""
        if show_alpha or fixed is None:
            parts = []
            for group in GROUPS:
                al = [r[group][0] for r in chosen if group in r]
                if al:
                    gain = [r[group][1] / r[group][2] for r in chosen if group in r and r[group][2]]
                    parts.append(f"{group} a={sum(al) / len(al):.2f}[{min(al):.2f}-{max(al):.2f}]"
                                 + (f" err x{sum(gain) / len(gain):.2f}" if gain else ""))
            note = "; ".join(parts)
        measure(label, apply(h.ref, h, quant, chosen, acts, True), note)
        return chosen

    awq(set(KINDS), "AWQ int8, all seven (alpha searched)")
    if args.quick:
        for k in ("k", "v", "down"):
            awq(set(KINDS) - {k}, f"AWQ int8, all but {k} (alpha searched)")
    else:
        for a in (0.25, 0.5):
            awq(set(KINDS), f"AWQ int8, all seven (alpha = {a} everywhere)", fixed=a)
        for k in KINDS:
            awq(set(KINDS) - {k}, f"AWQ int8, all but {k} (alpha searched)")
        awq({"o", "gate", "up"}, "AWQ int8, q k v down bf16 (shipped set)")
        print("one kind int8 at a time (which still flips most):", flush=True)
        for k in KINDS:
            measure(f"RTN int8, {k} only", rtn(h.ref, layers, {k}))
            awq({k}, f"AWQ int8, {k} only")

    print()
    print(f"Reference: bfloat16-rounded checkpoint, float32 compute. Top-2 logit margin < 0.1 / < 0.3 on "
          + ", ".join(f"{t}: {a} / {b}" for t, (a, b) in margins.items()) + " of 256 positions.")
    print()
    print("| variant | " + " | ".join(texts) + " | pooled (512) | alpha (mean [range]); output error vs alpha=0 |")
    print("|---|" + "---:|" * (len(texts) + 1) + "---|")
    for label, got, note in rows:
        pooled = sum(got.values()) / (256 * len(got))
        print(f"| {label} | " + " | ".join(f"{v / 256:.1%} ({v})" for v in got.values())
              + f" | {pooled:.1%} | {note} |")
    print(f"\n(calibration positions skipped: {args.skip_first}; {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
