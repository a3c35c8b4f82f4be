"""Numpy transcriptions of DeepSeek's own rules, written independently of ktjax: what the tests hold ktjax's
implementations to."""
import re

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn
FP8_BLOCK = 128  # DeepSeek-V3's FP8 weights: one scale per 128 x 128 block
# The tensors DeepSeek ships in FP8 (every linear layer but the router), and its config.json entry saying so.
FP8_SHIPPED = re.compile(r"_proj(_with_mqa)?\.weight$")
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


def fp8_quantize_blocks(w):
    """e4m3 values and one float32 scale per 128 x 128 block (edge blocks partial), as DeepSeek-V3 ships."""
    rows, cols = w.shape
    scale = np.zeros((-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)), np.float32)
    q = np.zeros(w.shape, E4M3)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = np.s_[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            scale[i, j] = max(float(np.abs(w[tile]).max()), 1e-12) / 448.0
            q[tile] = (w[tile] / scale[i, j]).astype(E4M3)
    return q, scale


def fp8_dequantize_blocks(q, scale):
    """DeepSeek's rule, W[i, j] = q[i, j] * s[i // 128, j // 128], written independently of ktjax."""
    rows, cols = q.shape
    return q.astype(np.float32) * np.repeat(np.repeat(scale, FP8_BLOCK, 0), FP8_BLOCK, 1)[:rows, :cols]


def fp8_act_quant(x, block=FP8_BLOCK):
    """DeepSeek's act_quant: each row's blocks of `block` channels scaled by amax / 448 (float32) and cast to e4m3
    -> (values [M, nk * block], the last block zero-padded; scales [M, nk])."""
    m, k = x.shape
    nk = -(-k // block)
    q, s = np.zeros((m, nk * block), E4M3), np.zeros((m, nk), np.float32)
    for i in range(m):
        for b in range(nk):
            part = x[i, b * block:(b + 1) * block].astype(np.float32)
            # amax / 448 and part / s as products with float32 reciprocals (the rounding ktjax reproduces; within
            # an ulp of DeepSeek's divisions); amax floored at 1e-4, as DeepSeek-V3.2's act_quant
            s[i, b] = np.float32(max(float(np.abs(part).max()), 1e-4)) * np.float32(1 / 448)
            q[i, b * block:b * block + part.size] = (part * (np.float32(1) / s[i, b])).astype(E4M3)
    return q, s


def fp8_gemm(x, w_q, w_scale, block=FP8_BLOCK):
    """DeepSeek's fp8_gemm for a weight in ktjax's [in, out] layout (w_q e4m3 [K, N], w_scale [K/128, N/128]):
    the activations quantized by fp8_act_quant, then over each block of 128 inputs the product of the e4m3
    values times the row's and the weight block's scales, summed in float64."""
    x_q, x_s = fp8_act_quant(x, block)
    k, n = w_q.shape
    y = np.zeros((x.shape[0], n))
    for b in range(x_s.shape[1]):
        rows = slice(b * block, min((b + 1) * block, k))
        part = x_q[:, rows].astype(np.float64) @ w_q[rows].astype(np.float64)
        y += part * x_s[:, b:b + 1] * np.repeat(w_scale[b].astype(np.float64), block)[:n]
    return y


def route_ref(logits, bias, *, arch, scoring, method, n_group, topk_group, k, norm, scale):
    """DeepSeek-V2's MoEGate (V2) and DeepSeek-V3's gate (V3), row by row in numpy."""
    out_w, out_i = [], []
    for row, in zip(logits.astype(np.float64)):
        scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if scoring == "softmax" else 1 / (1 + np.exp(-row))
        choice = scores + bias if method == "noaux_tc" else scores.copy()
        if method != "greedy":
            groups = choice.reshape(n_group, -1)
            gscore = np.sort(groups, axis=1)[:, -2:].sum(1) if method == "noaux_tc" else groups.max(1)
            keep = np.argsort(-gscore)[:topk_group]
            fill = -np.inf if method == "noaux_tc" else 0.0
            masked = np.full_like(groups, fill)
            masked[keep] = groups[keep]
            choice = masked.reshape(-1)
        idx = np.argsort(-choice)[:k]
        w = scores[idx]
        if arch == "v2":
            w = w / (w.sum() + 1e-20) if (k > 1 and norm) else w * scale
        else:
            w = (w / (w.sum() + 1e-20) if norm else w) * scale
        order = np.argsort(idx)
        out_w.append(w[order]), out_i.append(idx[order])
    return np.array(out_w), np.array(out_i)


def quantize_round_trip(fmt_name: str, x):
    """A latent cache format's round trip (quantize then dequantize) in float64 numpy."""
    from ktjax.kv.formats import FORMATS

    fmt = FORMATS[fmt_name]
    x = np.asarray(x, np.float64)
    if not fmt.quantized:
        return x.astype(fmt.store_dtype).astype(np.float64)
    out = np.empty_like(x)
    for start in range(0, x.shape[-1], fmt.group):
        block = x[..., start:start + fmt.group]
        amax = np.abs(block).max(-1, keepdims=True)
        scale = np.where(amax > 0, amax / fmt.qmax, 1.0).astype(np.float32).astype(np.float64)
        if fmt_name == "fp8":
            q = (block / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        else:
            q = np.clip(np.round(block / scale), -fmt.qmax, fmt.qmax)
        out[..., start:start + fmt.group] = q * scale
    return out


def latent_attention(q_lat, q_pe, c_kv, k_pe, q_positions, lengths, scale):
    """Absorbed attention over the whole cache at once: query i of sequence b sees key t iff t < lengths[b] and
    t <= q_positions[b, i]. -> o_lat [b, s, h, R]."""
    scores = (np.einsum("bshc,btc->bsht", q_lat, c_kv) + np.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    t = np.arange(c_kv.shape[1])
    visible = (t[None, None, :] < lengths[:, None, None]) & (t[None, None, :] <= q_positions[:, :, None])
    scores = np.where(visible[:, :, None, :], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bsht,btc->bshc", p, c_kv)
