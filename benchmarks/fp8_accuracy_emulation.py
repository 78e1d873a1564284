"""FP8 accuracy on the CPU: the default model (SmolLM2-135M-Instruct) teacher-forced on the
first ``--tokens`` tokens of README.md, with FP8 rounding emulated in plain PyTorch
(transformers' Llama, eager attention), against the same model in bf16 (issue #18).

The reference is the model in bf16 as the GPU engine runs it: bf16 weights (rounded from the
fp32 checkpoint), bf16 activations, fp32 accumulation, bf16 logits. Each variant changes
only what the engine's fp8 path would change:

- KV cache: K (after RoPE, as the engine stores it) and V are rounded through fp8 inside the
  attention function, for every position (the extend kernel reads the new tokens' K/V back
  from the cache). A Hadamard rotation H of the head dim is emulated as ``fp8(k H) H^T``:
  the same logits as rotating q and k (q.k is unchanged), without q's extra bf16 rounding.
  V rotated likewise is ``fp8(v H) H^T`` (the attention output rotated back).
- Weights: every decoder linear (not the embeddings / LM head) runs in fp32 with its weight
  dequantized from fp8 (quantized from the fp32 checkpoint, as the engine's loader does) and
  its input quantized to fp8 per token (``_scaled_mm``) or left as is (weight-only, the
  batch-1 GEMV); the output is rounded to bf16.

Calibration (SmoothQuant, GPTQ) uses ``--calib`` (default kernels/NOTES.md), never README.md.
Prints one JSON line per variant: top-1 agreement with the reference, mean |logprob diff| at
the reference's top-1, perplexity ratio; first the fp32-vs-bf16 line (the noise floor) with
the fraction of positions whose reference top-1/top-2 margin is below 0.1 / 0.25 nats, and
bf16 against itself with the linears run as fp32 matmuls of the bf16 operands (accumulation
order only). ``top1_se``: the binomial standard error of the agreement.

    cd /tmp && flock /tmp/radixfleet-bench.lock python3 /work/main/benchmarks/fp8_accuracy_emulation.py
        [--tokens 1500] [--only kv- w-] [--threads 1]

Run from outside the checkout root (its ``kernels/`` shadows HF's ``kernels`` package).
About 20 s per variant on one core, 35 variants, GPTQ ~1.5 min per basis: ~15 min in all.
The engine's own configurations reproduce the H100 figures (KV 0.936, weights 0.890).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama as llama
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
REPO = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache/radixfleet/models/SmolLM2-135M-Instruct"


def fp8_round(x: torch.Tensor, scale: torch.Tensor | float, dtype=E4M3) -> torch.Tensor:
    """fp32 ``x`` stored as fp8 ``clamp(x / scale)`` (round to nearest) and read back, fp32."""
    fmax = torch.finfo(dtype).max
    return (x / scale).clamp(-fmax, fmax).to(dtype).float() * scale


def amax_scale(x: torch.Tensor, dim, fmax: float = 448.0) -> torch.Tensor:  # amax / fmax
    return (x.abs().amax(dim=dim, keepdim=True) / fmax).clamp(min=1e-12)


def grouped(x: torch.Tensor, group: int, fn):
    """``fn`` applied to ``x [..., K]`` viewed as ``[..., K/group, group]`` (zero padded)."""
    k = x.shape[-1]
    xp = F.pad(x, (0, -k % group))
    return fn(xp.view(*x.shape[:-1], -1, group)).view(xp.shape)[..., :k]


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    assert h.shape[0] == n, "head_dim must be a power of two"
    return h / math.sqrt(n)  # orthonormal, symmetric


# ---- KV cache -------------------------------------------------------------------------------
@dataclass(frozen=True)
class KV:
    fmt: torch.dtype = E4M3
    k: bool = True  # round K (post-RoPE)
    v: bool = True
    rotate_k: bool = False  # Hadamard of the head dim
    rotate_v: bool = False
    per_token: bool = False  # dynamic scale per (token, head) = amax / fmax; else 1.0


KV_MODE: KV | None = None
_eager = llama.eager_attention_forward


def _kv_round(x: torch.Tensor, rotate: bool) -> torch.Tensor:
    """x [B, KVH, T, D] (model dtype) as an fp8 cache would give it back."""
    h = hadamard(x.shape[-1]) if rotate else torch.eye(x.shape[-1])  # H^T = H
    y = x.float() @ h
    fmax = torch.finfo(KV_MODE.fmt).max
    return (fp8_round(y, amax_scale(y, -1, fmax) if KV_MODE.per_token else 1.0, KV_MODE.fmt) @ h).to(x.dtype)


def attention(module, query, key, value, *args, **kwargs):
    if KV_MODE is not None:
        if KV_MODE.k:
            key = _kv_round(key, KV_MODE.rotate_k)
        if KV_MODE.v:
            value = _kv_round(value, KV_MODE.rotate_v)
    return _eager(module, query, key, value, *args, **kwargs)


llama.eager_attention_forward = attention  # LlamaAttention looks it up at call time


# ---- weights --------------------------------------------------------------------------------
class EmulatedLinear(nn.Module):
    """``y = act(x / smooth) @ w.T`` in fp32, rounded to x's dtype. ``w``: dequantized fp32."""

    def __init__(self, w: torch.Tensor, act=None, smooth: torch.Tensor | None = None):
        super().__init__()
        self.w, self.act, self.smooth = w, act, smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if self.smooth is None else x.float() / self.smooth
        return F.linear(y if self.act is None else self.act(y), self.w).to(x.dtype)


def w_channel(w, c: float = 1.0):
    return fp8_round(w, amax_scale(w, 1) * c)


def w_channel_mse(w, grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)):
    """Per row, the clipping factor c (scale = c * amax / 448) of least squared error."""
    cands = torch.stack([w_channel(w, c) for c in grid])  # [C, N, K]
    best = ((cands - w) ** 2).sum(-1).argmin(0)  # [N]
    return cands[best, torch.arange(w.shape[0])]


def w_block(w, b: int = 128):
    n, k = w.shape
    wp = F.pad(w, (0, -k % b, 0, -n % b))
    v = wp.view(wp.shape[0] // b, b, wp.shape[1] // b, b)
    return fp8_round(v, amax_scale(v, (1, 3))).view_as(wp)[:n, :k]


def rot64(x):
    """``x [..., K]`` times the block-diagonal Hadamard of 64-blocks (its own inverse), so that
    ``x @ w.T == rot64(x) @ rot64(w).T``: an online rotation of the GEMM's K dim (QuaRot)."""
    return grouped(x, 64, lambda v: v @ hadamard(64))


def a_token(x):
    return fp8_round(x, amax_scale(x, -1))


def a_group128(x):
    return grouped(x, 128, lambda v: fp8_round(v, amax_scale(v, -1)))


def gptq(w: torch.Tensor, h: torch.Tensor, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) onto the per-row e4m3 grid (scale amax / 448, fixed first):
    columns rounded in order, each one's error spread over the later columns by the inverse
    Hessian ``h = X^T X`` of the calibration inputs."""
    w, h = w.clone(), h.clone()
    scale = amax_scale(w, 1)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, err1, hi = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            qc = fp8_round(w1[:, i:i + 1], scale)[:, 0]
            q[:, i1 + i] = qc
            err = (w1[:, i] - qc) / hi[i, i]
            w1[:, i:] -= err[:, None] * hi[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


# ---- the model ------------------------------------------------------------------------------
def decoder_linears(model) -> list[tuple[str, nn.Module, str]]:
    """(``"layer.proj"``, parent, attribute) of every decoder linear."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            out += [(f"{i}.{a}", parent, a) for a, m in parent.named_children() if isinstance(m, nn.Linear)]
    return out


def input_stats(model, linears, ids) -> tuple[dict, dict]:
    """Per linear, over the calibration tokens: input amax per channel [K] and X^T X [K, K]."""
    amax, xtx, hooks = {}, {}, []
    for name, parent, attr in linears:
        def hook(_m, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            amax[name], xtx[name] = x.abs().amax(0), x.T @ x
        hooks.append(getattr(parent, attr).register_forward_hook(hook))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return amax, xtx


def smooth_factors(masters, amax, alpha: float) -> dict:
    """SmoothQuant: per input channel s = a^alpha / w^(1-alpha), shared by the linears that
    read the same input (q/k/v: folds into input_layernorm; gate/up: post_attention_layernorm;
    down: up_proj's rows; o_proj: a vector multiply in the activation quant, as GQA shares
    v_proj's rows between query heads)."""
    groups: dict[str, list[str]] = {}
    for name in masters:
        layer, proj = name.split(".")
        key = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        groups.setdefault(f"{layer}.{key.get(proj, proj)}", []).append(name)
    out = {}
    for names in groups.values():
        w = torch.cat([masters[n] for n in names]).abs().amax(0).clamp(min=1e-5)
        s = (amax[names[0]].clamp(min=1e-5) ** alpha / w ** (1 - alpha)).clamp(min=1e-5)
        out.update({n: s for n in names})
    return out


def run(model, ids, kv: KV | None = None, weights: dict | None = None, linears=()) -> torch.Tensor:
    """Log-softmax [T, vocab] (fp32) with KV mode ``kv`` and the linears in ``weights``
    (name → replacement module) swapped in for the call."""
    global KV_MODE
    KV_MODE, saved = kv, []
    for name, parent, attr in linears:
        if weights and name in weights:
            saved.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, weights[name])
    try:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    finally:
        KV_MODE = None
        for parent, attr, mod in saved:
            setattr(parent, attr, mod)


KV_VARIANTS = {
    "kv-e4m3 scale 1 (engine)": KV(),
    "kv-e4m3 K only": KV(v=False),
    "kv-e4m3 V only": KV(k=False),
    "kv-e4m3 hadamard K": KV(rotate_k=True),
    "kv-e4m3 hadamard K+V": KV(rotate_k=True, rotate_v=True),
    "kv-e4m3 per-token-head scales": KV(per_token=True),
    "kv-e4m3 per-token-head scales + hadamard K+V": KV(per_token=True, rotate_k=True, rotate_v=True),
    "kv-e5m2 scale 1": KV(fmt=E5M2),
}


def weight_variants(last: int) -> dict:
    """name → (weight quantizer kind, activation quantizer, keep(name): stays bf16, SmoothQuant alpha)."""
    a_rot = lambda x: a_token(rot64(x))  # noqa: E731
    out = {
        "w-channel + a-token (engine)": ("channel", a_token),
        "w-channel weight-only": ("channel", None),
        "w-channel + a-group128": ("channel", a_group128),
        "w-block128 + a-group128 (DeepSeek-V3)": ("block128", a_group128),
        "w-channel-mse + a-token": ("channel-mse", a_token),
        "w-channel-mse weight-only": ("channel-mse", None),
        "w-bf16 + a-token only": ("bf16", a_token),
        "w-bf16 + a-group128 only": ("bf16", a_group128),
        "w-bf16 + a-token only, hadamard-64 K dim": ("bf16-rot64", a_rot),
        "w-channel + a-token, hadamard-64 K dim": ("channel-rot64", a_rot),
        "w-channel weight-only, hadamard-64 K dim": ("channel-rot64", rot64),
    }
    for group, projs in {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                         "gate/up": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.items():
        out[f"w-channel + a-token, {group} kept bf16"] = ("channel", a_token, lambda n, p=projs: n.split(".")[1] in p)
    for layers in ({0}, {last}, {0, last}):
        out[f"w-channel + a-token, layers {sorted(layers)} kept bf16"] = (
            "channel", a_token, lambda n, s=layers: int(n.split(".")[0]) in s)
    for alpha in (0.5, 0.8):  # calibrated on --calib
        out[f"w-smoothquant a={alpha} + w-channel + a-token"] = (None, a_token, None, alpha)
    out |= {"w-gptq channel + a-token": ("gptq", a_token), "w-gptq channel weight-only": ("gptq", None),
            "w-gptq channel + a-token, down_proj kept bf16": ("gptq", a_token, lambda n: n.endswith("down_proj")),
            "w-gptq channel, hadamard-64 K dim + a-token": ("gptq-rot64", a_rot),
            "w-gptq channel, hadamard-64 K dim weight-only": ("gptq-rot64", rot64)}
    return {name: (v + (None, None))[:4] for name, v in out.items()}


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, target: torch.Tensor, **extra) -> dict:
    ours, ref = ours[:-1], ref[:-1]
    chosen = ref.argmax(-1, keepdim=True)
    nll = lambda lp: -lp.gather(-1, target[:, None]).mean().item()  # noqa: E731
    top1 = (ours.argmax(-1) == chosen[:, 0]).float().mean().item()
    row = {"variant": name, "top1": round(top1, 4), "top1_se": round(math.sqrt(top1 * (1 - top1) / len(target)), 4),
           "logprob_diff": round((ours.gather(-1, chosen) - ref.gather(-1, chosen)).abs().mean().item(), 4),
           "ppl_ratio": round(math.exp(nll(ours) - nll(ref)), 4), **extra}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--text", default=str(REPO / "README.md"))
    p.add_argument("--calib", default=str(REPO / "kernels/NOTES.md"), help="calibration text (not the test text)")
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="run only variants whose name contains one of these")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok.encode(Path(args.text).read_text())[: args.tokens]
    calib = tok.encode(Path(args.calib).read_text())[: args.tokens]
    target = torch.tensor(ids[1:])

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    linears = decoder_linears(model)
    masters = {n: getattr(par, a).weight.detach().clone() for n, par, a in linears}  # fp32 checkpoint
    fp32 = run(model, ids)
    model.to(torch.bfloat16)
    ref = run(model, ids)
    top2 = ref[:-1].topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    compare("noise-floor fp32 vs bf16", fp32, ref, target,
            margin_lt_0_1=round((margin < 0.1).float().mean().item(), 4),
            margin_lt_0_25=round((margin < 0.25).float().mean().item(), 4),
            ppl_bf16=round(math.exp(-ref[:-1].gather(-1, target[:, None]).mean().item()), 4))

    bf16_fp32acc = {n: EmulatedLinear(w.bfloat16().float()) for n, w in masters.items()}
    compare("noise-floor bf16, linears via fp32 matmul", run(model, ids, weights=bf16_fp32acc, linears=linears),
            ref, target)

    wanted = lambda n: args.only is None or any(s in n for s in args.only)  # noqa: E731
    for name, kv in KV_VARIANTS.items():
        if wanted(name):
            compare(name, run(model, ids, kv=kv), ref, target)

    stats: dict = {}  # --calib input statistics, computed when a variant first needs them

    def calibrated(key: str):
        if not stats:
            stats["amax"], stats["xtx"] = input_stats(model, linears, calib)
        return stats[key]

    last = len(model.model.layers) - 1
    quantizers = {  # kind → (name, fp32 weight) → dequantized fp32 weight
        "channel": lambda n, w: w_channel(w), "channel-mse": lambda n, w: w_channel_mse(w),
        "block128": lambda n, w: w_block(w), "bf16": lambda n, w: w.bfloat16().float(),
        "bf16-rot64": lambda n, w: rot64(w.bfloat16().float()), "channel-rot64": lambda n, w: w_channel(rot64(w)),
        "gptq": lambda n, w: gptq(w, calibrated("xtx")[n]),
        # In the rotated basis X^T X becomes Hb^T X^T X Hb.
        "gptq-rot64": lambda n, w: gptq(rot64(w), rot64(rot64(calibrated("xtx")[n]).T).T),
    }
    cache: dict[str, dict] = {}
    for name, (kind, act, keep, alpha) in weight_variants(last).items():
        if not wanted(name):
            continue
        if alpha is not None:  # SmoothQuant: y = q(x / s) @ q(w * s).T
            s = smooth_factors(masters, calibrated("amax"), alpha)
            ws = {n: EmulatedLinear(w_channel(w * s[n]), act, s[n]) for n, w in masters.items()}
        else:
            if kind not in cache:  # one kind at a time (~0.4 GB each)
                cache.clear()
                cache[kind] = {n: quantizers[kind](n, w) for n, w in masters.items()}
            ws = {n: EmulatedLinear(w, act) for n, w in cache[kind].items() if not (keep and keep(n))}
        compare(name, run(model, ids, weights=ws, linears=linears), ref, target)


if __name__ == "__main__":
    main()
