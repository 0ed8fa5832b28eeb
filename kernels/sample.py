"""Batched token sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds, no host sync.

Semantics, per row b of `logits [B, V]` (the same in the Triton kernel and in `reference`):

1. Penalties (vLLM's): a token seen in the prompt or the output (`prompt_mask[b, v]` or `output_counts[b, v] >
   0`) has its logit divided by `repetition_penalty` when positive, multiplied by it otherwise; then
   `logit -= frequency_penalty * output_counts[b, v]` and `logit -= presence_penalty * (output_counts[b, v] > 0)`.
2. `temperature == 0`: greedy, the lowest index of the largest penalized logit; steps 3–6 are skipped.
   Otherwise `x = logit / temperature`.
3. top-k (`0` or `>= V` = off): keep `x >= t_k`, `t_k` the k-th largest x (ties at `t_k` are all kept).
4. top-p (`>= 1` = off): with `e = exp(x - max x)` over the kept tokens and `Z` their sum, keep `x >= t_p`
   where `t_p` is the largest kept value whose mass `sum(e[x >= t_p])` is `>= top_p * Z` (the smallest set of
   top tokens holding `top_p` of the probability; ties kept; at least the top token).
5. min-p (`<= 0` = off): keep `x >= max x + log(min_p)`, i.e. `p >= min_p * p_max`.
6. Draw: Gumbel-max over the kept tokens, `argmax(x + g)` with `g = -log(-log(u))` and `u` from a counter-based
   hash of (`seed[b]`, `step[b]`, vocab index). The draw depends on nothing else, so **a seed gives the same
   tokens whatever else shares the batch**; the engine bumps `step` once per generated token.

Returned log-probabilities are of the raw model distribution (`log_softmax(logits)` before penalties and
temperature, vLLM's default `raw_logprobs`): the chosen token's, and optionally the top-n tokens'.

The kernels never sort. Pass 1 splits each row over segments of up to 2048 tokens (logsumexp, greedy and Gumbel
argmax per segment, and, when 1 <= top_k <= 128, each segment's top-128 tokens as candidates: the global top-k lies
among them); a finisher per row combines them. Greedy and unfiltered draws end there; filtered draws find their
thresholds by a 16-way search over the order-preserving integer image of the fp32 values (exact after at most 8
passes), counting tokens (top-k) or summing their mass (top-p), over the candidates, or over the whole row when
top-k is off or larger than 128. The reference finds the same thresholds by sorting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton

_MASK32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 constants
_GOLDEN = 0x9E3779B9


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters, all on the logits' device, each shaped [B].

    temperature fp32 (0 = greedy) · top_k int32 (0 = off) · top_p fp32 (1 = off) · min_p fp32 (0 = off) ·
    repetition_penalty fp32 (1 = off) · frequency_penalty fp32 (0 = off) · presence_penalty fp32 (0 = off) ·
    seed int64 · step int64 (tokens generated so far by the request; the RNG counter).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor

    @classmethod
    def filled(
        cls, batch: int, device: torch.device | str = "cpu", *, seed: int = 0, step: int = 0, **values: float
    ) -> SamplingTensors:
        """Every row alike: `SamplingTensors.filled(4, temperature=0.7, top_p=0.9)`; unnamed fields are off."""
        defaults = dict(
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            repetition_penalty=1.0,
            frequency_penalty=0.0,
            presence_penalty=0.0,
        )
        unknown = set(values) - set(defaults)
        if unknown:
            raise ValueError(f"unknown sampling fields {sorted(unknown)}")
        defaults.update(values)
        fields = {
            name: torch.full(
                (batch,), v, dtype=torch.int32 if name == "top_k" else torch.float32, device=device
            )
            for name, v in defaults.items()
        }
        fields["seed"] = torch.full((batch,), seed, dtype=torch.int64, device=device)
        fields["step"] = torch.full((batch,), step, dtype=torch.int64, device=device)
        return cls(**fields)

    def validate(self, batch: int, device: torch.device) -> None:
        dtypes = {"top_k": torch.int32, "seed": torch.int64, "step": torch.int64}
        for name in self.__dataclass_fields__:
            t = getattr(self, name)
            want = dtypes.get(name, torch.float32)
            if tuple(t.shape) != (batch,) or t.dtype != want or t.device != device:
                raise ValueError(
                    f"sampling tensor {name} is {t.dtype} {tuple(t.shape)} on {t.device}, expected {want} "
                    f"({batch},) on {device}"
                )


@dataclass(frozen=True)
class SampleResult:
    """token_ids int64 [B] · logprobs fp32 [B] (raw, of the chosen token) · top_ids int64 [B, n] and
    top_logprobs fp32 [B, n] (raw, descending; n = 0 when not asked)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


# ----------------------------------------------------------------------------------------------- RNG (shared)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 13)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """int64 [B] in [0, 2**32): the per-row RNG key from (seed, step), on the device, no host sync."""
    seed = seed.to(torch.int64)
    h = _fmix32((seed & _MASK32) ^ _GOLDEN)
    h = _fmix32(h ^ ((seed >> 32) & _MASK32))
    return _fmix32(h ^ (step.to(torch.int64) & _MASK32))


def uniforms(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 [B, V] in (0, 1): u[b, v] = (fmix32(key[b] ^ (v * golden mod 2**32)) >> 8 + 0.5) / 2**24."""
    idx = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    r = _fmix32(keys[:, None] ^ _mul32(idx, _GOLDEN)[None, :])
    return ((r >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


# ------------------------------------------------------------------------------------------------ reference


def _penalize(logits, params, output_counts, prompt_mask):
    x = logits.float()
    if output_counts is None and prompt_mask is None:
        return x
    counts = output_counts.float() if output_counts is not None else torch.zeros_like(x)
    seen = counts > 0
    if prompt_mask is not None:
        seen = seen | prompt_mask.bool()
    rp = params.repetition_penalty[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
    x = x - params.frequency_penalty[:, None] * counts
    return x - params.presence_penalty[:, None] * (counts > 0).float()


def _keep_mask(x: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """bool [B, V]: the tokens that survive top-k, top-p and min-p, by sorting."""
    b, v = x.shape
    s, _ = torch.sort(x, dim=-1, descending=True)
    k = params.top_k.long()
    k_on = (k > 0) & (k < v)
    t_k = s.gather(1, (k.clamp(1, v) - 1)[:, None])
    t = torch.where(k_on[:, None], t_k, s[:, -1:])
    m = s[:, :1]
    p_on = params.top_p < 1
    kept_s = s >= t
    e = torch.where(kept_s, torch.exp(s - m), 0.0)
    cs = torch.cumsum(e, dim=-1)
    z = cs[:, -1:]
    # mass(s_i) counts every tie of s_i: take the cumsum at the last index holding s_i's value
    asc = s.flip(-1).contiguous()
    n_ge = v - torch.searchsorted(asc, s.contiguous(), right=False)
    mass = cs.gather(1, n_ge - 1)
    ok = kept_s & (mass >= params.top_p[:, None] * z)
    t_p = torch.where(ok, s, torch.full_like(s, float("-inf"))).amax(dim=-1, keepdim=True)
    t_p = torch.where(ok.any(-1, keepdim=True), t_p, t)
    t = torch.where(p_on[:, None], torch.maximum(t, t_p), t)
    min_on = params.min_p > 0
    t_min = m + torch.log(params.min_p.clamp_min(1e-30))[:, None]
    t = torch.where(min_on[:, None], torch.maximum(t, t_min), t)
    return x >= t


def _logprob_outputs(logits, tokens, lse, num_logprobs):
    lp = logits.float().gather(1, tokens[:, None])[:, 0] - lse
    if num_logprobs > 0:
        top_vals, top_ids = torch.topk(logits.float(), num_logprobs, dim=-1)
        top_lp = top_vals - lse[:, None]
    else:
        top_ids = torch.empty(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
        top_lp = torch.empty(logits.shape[0], 0, dtype=torch.float32, device=logits.device)
    return SampleResult(tokens, lp, top_ids, top_lp)


def reference(
    logits: torch.Tensor,
    params: SamplingTensors,
    output_counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    num_logprobs: int = 0,
) -> SampleResult:
    """Plain-torch `sample` (sorting for the thresholds); same arguments, same result."""
    _validate(logits, params, output_counts, prompt_mask, num_logprobs)
    x = _penalize(logits, params, output_counts, prompt_mask)
    greedy_tok = x.argmax(dim=-1)
    temp = params.temperature[:, None]
    xs = x / torch.where(temp > 0, temp, 1.0)
    keep = _keep_mask(xs, params)
    g = -torch.log(-torch.log(uniforms(row_keys(params.seed, params.step), x.shape[1])))
    score = torch.where(keep, xs + g, float("-inf"))
    drawn = score.argmax(dim=-1)
    tokens = torch.where(params.temperature > 0, drawn, greedy_tok)
    lse = torch.logsumexp(logits.float(), dim=-1)
    return _logprob_outputs(logits, tokens, lse, num_logprobs)


# ------------------------------------------------------------------------------------------------ Triton


@triton.jit
def _fmix32_tl(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _row_key_tl(seed, step):
    """`row_keys` for one row, in uint32 arithmetic (seed, step: int64 scalars)."""
    h = _fmix32_tl((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    h = _fmix32_tl(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return _fmix32_tl(h ^ (step & 0xFFFFFFFF).to(tl.uint32))


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (+0.0 and -0.0 map alike)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _load_x(
    logits_row, counts_row, prompt_row, offs, V, rp, fp, pp, inv_t,
    HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
):  # fmt: skip
    """Penalized, temperature-scaled logits of one chunk; -inf past V."""
    valid = offs < V
    x = tl.load(logits_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_COUNTS or HAS_PROMPT:
        # rows without penalties read no counts: a masked-off load moves no bytes
        pen_lim = tl.where((rp != 1.0) | (fp != 0.0) | (pp != 0.0), V, 0)
        if HAS_COUNTS:
            c = tl.load(counts_row + offs, mask=offs < pen_lim, other=0).to(tl.float32)
        else:
            c = tl.zeros_like(x)
        seen = c > 0
        if HAS_PROMPT:
            seen = seen | (tl.load(prompt_row + offs, mask=offs < pen_lim, other=0) != 0)
        x = tl.where(seen, tl.where(x > 0, x / rp, x * rp), x)
        x = x - fp * c
        x = x - pp * tl.where(c > 0, 1.0, 0.0)
    return x * inv_t


@triton.jit
def _chunk(
    logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, start, N, V, rp, fp, pp, inv_t,
    FROM_CAND: tl.constexpr, KC: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """(x, vocab index, valid) of chunk [start, start + BLOCK): from the row itself (N = V), or from the row's
    candidate buffer (FROM_CAND: N = S * KC slots, slot j of segment j // KC valid below that segment's count)."""
    offs = start + tl.arange(0, BLOCK)
    if FROM_CAND:
        valid = (offs < N) & ((offs % KC) < tl.load(ncand_row + offs // KC, mask=offs < N, other=0))
        x = tl.load(cx_row + offs, mask=valid, other=float("-inf"))
        idx = tl.load(ci_row + offs, mask=valid, other=0)
    else:
        valid = offs < V
        x = _load_x(logits_row, counts_row, prompt_row, offs, V, rp, fp, pp, inv_t, HAS_COUNTS, HAS_PROMPT)
        idx = offs
    return x, idx, valid


@triton.jit
def _search_keys(key, lo, hi, target, NT: tl.constexpr):
    """`_search` over keys held in registers, counting; one reduction per candidate keeps registers low."""
    j = tl.arange(0, NT)
    while lo < hi:
        step = (hi - lo + NT - 1) // NT
        cand = tl.minimum(lo + (j + 1).to(tl.int64) * step, hi)
        acc = tl.zeros([NT], dtype=tl.int32)
        for t in tl.static_range(NT):
            c = tl.minimum(lo + (t + 1) * step, hi).to(tl.int32)
            acc = tl.where(j == t, tl.sum((key >= c).to(tl.int32), axis=0), acc)
        ok = acc >= target
        new_lo = tl.max(tl.where(ok, cand, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, cand - 1), axis=0)
        lo = new_lo
    return lo


@triton.jit
def _search(
    logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, N, V, rp, fp, pp, inv_t, m, lo, hi, target,
    USE_MASS: tl.constexpr, FROM_CAND: tl.constexpr, KC: tl.constexpr,
    HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, BLOCK: tl.constexpr, NT: tl.constexpr,
):  # fmt: skip
    """Largest order key K in [lo, hi] with f(K) >= target, f(K) = count (or exp-mass) of tokens with key >= K.
    Assumes f(lo) >= target (returns lo when nothing above it qualifies)."""
    j = tl.arange(0, NT) + 1
    while lo < hi:
        step = (hi - lo + NT - 1) // NT
        cand = tl.minimum(lo + j.to(tl.int64) * step, hi)
        cand32 = cand.to(tl.int32)
        acc = tl.zeros([NT], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            x, _, valid = _chunk(
                logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, start, N, V, rp, fp, pp, inv_t,
                FROM_CAND, KC, HAS_COUNTS, HAS_PROMPT, BLOCK,
            )  # fmt: skip
            key = tl.where(valid, _order_key(x), -2147483648)
            ge = key[:, None] >= cand32[None, :]
            w = tl.exp(x - m) if USE_MASS else tl.where(valid, 1.0, 0.0)
            acc += tl.sum(tl.where(ge, w[:, None], 0.0), axis=0)
        ok = acc >= target
        new_lo = tl.max(tl.where(ok, cand, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, cand - 1), axis=0)
        lo = new_lo
    return lo


@triton.jit
def _filtered_draw(
    logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, N, V, rp, fp, pp, inv_t, m, lo, hi,
    top_k, top_p, min_p, rkey, z_total,
    FROM_CAND: tl.constexpr, KC: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
    BLOCK: tl.constexpr, NT: tl.constexpr,
):  # fmt: skip
    """Thresholds for top-k, top-p, min-p, then Gumbel-max over the kept tokens; returns the vocab index.
    `z_total` > 0: top-p's mass denominator (top-k off, tokens below `lo` not loaded), else summed here."""
    if (top_k > 0) & (top_k < V):
        lo = _search(
            logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, N, V, rp, fp, pp, inv_t, m, lo, hi,
            top_k.to(tl.float32), False, FROM_CAND, KC, HAS_COUNTS, HAS_PROMPT, BLOCK, NT,
        )  # fmt: skip
    if top_p < 1.0:
        z = tl.zeros([BLOCK], dtype=tl.float32)
        if z_total <= 0:
            for start in range(0, N, BLOCK):
                x, _, valid = _chunk(
                    logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, start, N, V, rp, fp, pp, inv_t,
                    FROM_CAND, KC, HAS_COUNTS, HAS_PROMPT, BLOCK,
                )  # fmt: skip
                z += tl.where(valid & (_order_key(x).to(tl.int64) >= lo), tl.exp(x - m), 0.0)
        zsum = tl.where(z_total > 0, z_total, tl.sum(z, axis=0))
        lo = _search(
            logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, N, V, rp, fp, pp, inv_t, m, lo, hi,
            top_p * zsum, True, FROM_CAND, KC, HAS_COUNTS, HAS_PROMPT, BLOCK, NT,
        )  # fmt: skip
    if min_p > 0:
        lo = tl.maximum(lo, _order_key(m + tl.log(min_p)).to(tl.int64))
    thr = lo.to(tl.int32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        x, idx, valid = _chunk(
            logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, start, N, V, rp, fp, pp, inv_t,
            FROM_CAND, KC, HAS_COUNTS, HAS_PROMPT, BLOCK,
        )  # fmt: skip
        score = x + _gumbel(rkey, idx)
        score = tl.where(valid & (_order_key(x) >= thr), score, float("-inf"))
        take = (score > best) | ((score == best) & (idx < best_i))
        best_i = tl.where(take, idx, best_i)
        best = tl.where(take, score, best)
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, best_i, 2147483647), axis=0)


@triton.jit
def _gumbel(rkey, idx):
    r = _fmix32_tl(rkey ^ (idx.to(tl.uint32) * 0x9E3779B9))
    u = ((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _segment_kernel(
    logits_ptr, stride_l, counts_ptr, stride_c, prompt_ptr, stride_p,
    temp_ptr, topk_ptr, topp_ptr, minp_ptr, rep_ptr, freq_ptr, pres_ptr, seed_ptr, step_ptr,
    pf_ptr, pi_ptr, cx_ptr, ci_ptr, V, S,
    HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, SEG: tl.constexpr, KC: tl.constexpr, NT: tl.constexpr,
):  # fmt: skip
    """Pass 1, split over S segments of SEG tokens per row: partial logsumexp, greedy argmax, Gumbel argmax, the
    smallest key, and (when 1 <= top_k <= KC) the segment's top-KC tokens as candidates for the finisher."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    rp = tl.load(rep_ptr + row)
    fp = tl.load(freq_ptr + row)
    pp = tl.load(pres_ptr + row)
    inv_t = tl.where(temp > 0, 1.0 / tl.where(temp > 0, temp, 1.0), 1.0)
    logits_row = logits_ptr + row * stride_l
    offs = seg * SEG + tl.arange(0, SEG)
    valid = offs < V
    raw = tl.load(logits_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
    raw_m = tl.max(raw, axis=0)
    raw_s = tl.sum(tl.exp(raw - tl.where(raw_m == float("-inf"), 0.0, raw_m)), axis=0)
    x = _load_x(
        logits_row, counts_ptr + row * stride_c, prompt_ptr + row * stride_p, offs, V, rp, fp, pp, inv_t,
        HAS_COUNTS, HAS_PROMPT,
    )  # fmt: skip
    x_max = tl.max(x, axis=0)
    greedy = tl.min(tl.where(valid & (x == x_max), offs, 2147483647), axis=0)
    key = tl.where(valid, _order_key(x), -2147483648)
    key_min = tl.min(tl.where(valid, key, 2147483647), axis=0)
    top_k = tl.load(topk_ptr + row)
    g_best = tl.full((), float("-inf"), tl.float32)
    g_i = tl.full((), 2147483647, tl.int32)
    unfiltered = (
        ((top_k <= 0) | (top_k >= V)) & (tl.load(topp_ptr + row) >= 1.0) & (tl.load(minp_ptr + row) <= 0)
    )
    if (temp > 0) & unfiltered:  # the finisher draws from these alone
        rkey = _row_key_tl(tl.load(seed_ptr + row), tl.load(step_ptr + row))
        score = tl.where(valid, x + _gumbel(rkey, offs), float("-inf"))
        g_best = tl.max(score, axis=0)
        g_i = tl.min(tl.where(score == g_best, offs, 2147483647), axis=0)
    ncand = tl.full((), -1, tl.int32)
    cutoff = tl.full((), -2147483648, tl.int32)  # every token of the segment at or above it is a candidate
    k_fits = (top_k >= 1) & (top_k <= KC)
    k_off = (top_k <= 0) | (top_k >= V)
    if (temp > 0) & (k_fits | (k_off & (not unfiltered))):
        lo = key_min.to(tl.int64)
        if tl.sum(valid.to(tl.int32), axis=0) > KC:
            lo = _search_keys(key, lo, _order_key(x_max).to(tl.int64), KC, NT)
            cutoff = lo.to(tl.int32)
        sel = valid & (key.to(tl.int64) >= lo)
        ncand = tl.sum(sel.to(tl.int32), axis=0)
        pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        slot = (row * tl.num_programs(1) + seg) * KC + pos
        tl.store(cx_ptr + slot, x, mask=sel & (pos < KC))
        tl.store(ci_ptr + slot, offs, mask=sel & (pos < KC))
        ncand = tl.where(ncand <= KC, ncand, -1)  # -1: ties overflowed the buffer, take the full-row path
    z_seg = tl.sum(
        tl.where(valid, tl.exp(x - x_max), 0.0), axis=0
    )  # this segment's mass, in units of e^x_max
    part = (row * S + seg) * 6
    tl.store(pf_ptr + part + 0, raw_m)
    tl.store(pf_ptr + part + 1, raw_s)
    tl.store(pf_ptr + part + 2, x_max)
    tl.store(pf_ptr + part + 3, g_best)
    tl.store(pf_ptr + part + 4, z_seg)
    tl.store(pi_ptr + part + 0, greedy)
    tl.store(pi_ptr + part + 1, g_i)
    tl.store(pi_ptr + part + 2, key_min)
    tl.store(pi_ptr + part + 3, ncand)
    tl.store(pi_ptr + part + 4, cutoff)


@triton.jit
def _finish_kernel(
    logits_ptr, stride_l, counts_ptr, stride_c, prompt_ptr, stride_p,
    temp_ptr, topk_ptr, topp_ptr, minp_ptr, rep_ptr, freq_ptr, pres_ptr, seed_ptr, step_ptr,
    pf_ptr, pi_ptr, cx_ptr, ci_ptr, ncand_ptr, tok_ptr, lp_ptr, lse_ptr, V, S,
    HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, S_PAD: tl.constexpr, KC: tl.constexpr,
    BLOCK: tl.constexpr, NT: tl.constexpr,
):  # fmt: skip
    """Per row: combine the segments' partials; greedy and unfiltered draws end here, filtered draws search the
    candidates (top-k <= KC) or, failing that, the whole row."""
    row = tl.program_id(0).to(tl.int64)
    sidx = tl.arange(0, S_PAD)
    smask = sidx < S
    part = (row * S + sidx) * 6
    raw_m = tl.load(pf_ptr + part + 0, mask=smask, other=float("-inf"))
    raw_s = tl.load(pf_ptr + part + 1, mask=smask, other=0.0)
    x_max = tl.load(pf_ptr + part + 2, mask=smask, other=float("-inf"))
    g_best = tl.load(pf_ptr + part + 3, mask=smask, other=float("-inf"))
    greedy = tl.load(pi_ptr + part + 0, mask=smask, other=2147483647)
    g_i = tl.load(pi_ptr + part + 1, mask=smask, other=2147483647)
    key_min = tl.load(pi_ptr + part + 2, mask=smask, other=2147483647)
    ncand = tl.load(pi_ptr + part + 3, mask=smask, other=0)
    cutoff = tl.load(pi_ptr + part + 4, mask=smask, other=-2147483648)
    z_seg = tl.load(pf_ptr + part + 4, mask=smask, other=0.0)
    gm = tl.max(raw_m, axis=0)
    lse = gm + tl.log(tl.sum(tl.where(raw_m == float("-inf"), 0.0, raw_s * tl.exp(raw_m - gm)), axis=0))
    tl.store(lse_ptr + row, lse)
    m = tl.max(x_max, axis=0)
    tok = tl.min(tl.where(x_max == m, greedy, 2147483647), axis=0)
    temp = tl.load(temp_ptr + row)
    if temp > 0:
        top_k = tl.load(topk_ptr + row)
        top_p = tl.load(topp_ptr + row)
        min_p = tl.load(minp_ptr + row)
        k_on = (top_k > 0) & (top_k < V)
        if (not k_on) & (top_p >= 1.0) & (min_p <= 0):
            gb = tl.max(g_best, axis=0)
            tok = tl.min(tl.where(g_best == gb, g_i, 2147483647), axis=0)
        else:
            rp = tl.load(rep_ptr + row)
            fp = tl.load(freq_ptr + row)
            pp = tl.load(pres_ptr + row)
            inv_t = 1.0 / temp
            rkey = _row_key_tl(tl.load(seed_ptr + row), tl.load(step_ptr + row))
            logits_row = logits_ptr + row * stride_l
            counts_row = counts_ptr + row * stride_c
            prompt_row = prompt_ptr + row * stride_p
            cx_row = cx_ptr + row * S * KC
            ci_row = ci_ptr + row * S * KC
            ncand_row = ncand_ptr + row * S_PAD
            lo = tl.min(key_min, axis=0).to(tl.int64)
            hi = _order_key(m).to(tl.int64)
            cand_ok = tl.min(tl.where(smask, ncand, 0), axis=0) >= 0
            z_total = tl.sum(tl.where(x_max == float("-inf"), 0.0, z_seg * tl.exp(x_max - m)), axis=0)
            # every token at or above `floor` is a candidate; without top-k <= KC the candidates serve only if
            # the kept set provably lies above it: min-p's threshold does, or top-p's mass is reached there
            floor = tl.maximum(tl.max(cutoff, axis=0).to(tl.int64), lo)
            covered = (top_k >= 1) & (top_k <= KC)
            if cand_ok & (not covered) & (not k_on):
                tl.store(ncand_row + sidx, ncand, mask=smask)
                above = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, S * KC, BLOCK):
                    x, _, valid = _chunk(
                        logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, start, S * KC, V,
                        rp, fp, pp, inv_t, True, KC, HAS_COUNTS, HAS_PROMPT, BLOCK,
                    )  # fmt: skip
                    above += tl.where(valid & (_order_key(x).to(tl.int64) >= floor), tl.exp(x - m), 0.0)
                p_ok = (top_p >= 1.0) | (tl.sum(above, axis=0) >= top_p * z_total)
                m_ok = (min_p <= 0) | (
                    _order_key(m + tl.log(tl.where(min_p > 0, min_p, 1.0))).to(tl.int64) >= floor
                )
                covered = p_ok & ((top_p < 1.0) | m_ok)
                lo = tl.where(covered, floor, lo)
            if cand_ok & covered:
                tl.store(ncand_row + sidx, ncand, mask=smask)
                tok = _filtered_draw(
                    logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, S * KC, V,
                    rp, fp, pp, inv_t, m, lo, hi, top_k, top_p, min_p, rkey, tl.where(k_on, 0.0, z_total),
                    True, KC, HAS_COUNTS, HAS_PROMPT, BLOCK, NT,
                )  # fmt: skip
            else:
                tok = _filtered_draw(
                    logits_row, counts_row, prompt_row, cx_row, ci_row, ncand_row, V, V,
                    rp, fp, pp, inv_t, m, tl.min(key_min, axis=0).to(tl.int64), hi, top_k, top_p, min_p, rkey, 0.0,
                    False, KC, HAS_COUNTS, HAS_PROMPT, BLOCK, NT,
                )  # fmt: skip
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, tl.load(logits_ptr + row * stride_l + tok).to(tl.float32) - lse)


# ------------------------------------------------------------------------------------------------ launcher


def _validate(logits, params, output_counts, prompt_mask, num_logprobs):
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be [B, V] fp32/bf16/fp16, got {logits.dtype} {tuple(logits.shape)}")
    b, v = logits.shape
    params.validate(b, logits.device)
    for name, t in (("output_counts", output_counts), ("prompt_mask", prompt_mask)):
        if t is not None and (tuple(t.shape) != (b, v) or t.device != logits.device):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} on {t.device}, expected {(b, v)} on {logits.device}"
            )
    if not 0 <= num_logprobs <= v:
        raise ValueError(f"num_logprobs={num_logprobs} must be in [0, {v}]")


def sample(
    logits: torch.Tensor,
    params: SamplingTensors,
    output_counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    num_logprobs: int = 0,
) -> SampleResult:
    """Sample one token per row (semantics in the module docstring). No host synchronisation.

    logits [B, V] fp32 (bf16/fp16 accepted) · params: `SamplingTensors` of [B] tensors · output_counts int32
    [B, V] (how often each token was generated; `token_counts` builds it) or None · prompt_mask bool/uint8 [B, V]
    (tokens of the prompt, for the repetition penalty) or None · num_logprobs: top-n raw log-probs to return.
    """
    _validate(logits, params, output_counts, prompt_mask, num_logprobs)
    if not use_triton(logits):
        return reference(logits, params, output_counts, prompt_mask, num_logprobs)
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    lp_lse = torch.empty(2, b, dtype=torch.float32, device=logits.device)  # chosen logprob, logsumexp
    if b == 0:
        return _logprob_outputs(logits, tokens, lp_lse[1], num_logprobs)
    counts = output_counts.contiguous() if output_counts is not None else logits
    prompt = prompt_mask.contiguous() if prompt_mask is not None else logits
    if prompt.dtype == torch.bool:
        prompt = prompt.view(torch.uint8)
    seg = min(2048, max(128, triton.next_power_of_2(triton.cdiv(v, 8))))
    num_seg, kc = triton.cdiv(v, seg), min(128, seg // 2)
    dev = logits.device
    # per segment: raw max, raw sum, x max, gumbel max, x mass, - | argmax, gumbel argmax, min key, #cand, cutoff, -
    part_f = torch.empty(b, num_seg, 6, dtype=torch.float32, device=dev)
    part_i = torch.empty(b, num_seg, 6, dtype=torch.int32, device=dev)
    cand_x = torch.empty(b, num_seg, kc, dtype=torch.float32, device=dev)
    cand_i = torch.empty(b, num_seg, kc, dtype=torch.int32, device=dev)
    s_pad = triton.next_power_of_2(num_seg)
    ncand = torch.empty(b, s_pad, dtype=torch.int32, device=dev)
    common = (
        logits,
        logits.stride(0),
        counts,
        counts.stride(0),
        prompt,
        prompt.stride(0),
        params.temperature,
    )
    penalties = (params.repetition_penalty, params.frequency_penalty, params.presence_penalty)
    flags = dict(HAS_COUNTS=output_counts is not None, HAS_PROMPT=prompt_mask is not None, KC=kc, NT=16)
    _segment_kernel[(b, num_seg)](
        *common, params.top_k, params.top_p, params.min_p, *penalties, params.seed, params.step,
        part_f, part_i, cand_x, cand_i, v, num_seg,
        SEG=seg, num_warps=8, **flags,
    )  # fmt: skip
    _finish_kernel[(b,)](
        *common, params.top_k, params.top_p, params.min_p, *penalties, params.seed, params.step,
        part_f, part_i, cand_x, cand_i, ncand, tokens, lp_lse[0], lp_lse[1], v, num_seg,
        S_PAD=s_pad, BLOCK=1024, num_warps=8, **flags,
    )  # fmt: skip
    if num_logprobs == 0:  # the common case: no launch beyond the two kernels
        no_ids = torch.empty(b, 0, dtype=torch.int64, device=logits.device)
        return SampleResult(tokens, lp_lse[0], no_ids, torch.empty(b, 0, device=logits.device))
    return _logprob_outputs(logits, tokens, lp_lse[1], num_logprobs)


def token_counts(token_ids: torch.Tensor, vocab_size: int, pad_id: int = -1) -> torch.Tensor:
    """int32 [B, V] occurrence counts of `token_ids [B, L]` (entries equal to `pad_id` ignored), on the device."""
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be [B, L], got {tuple(token_ids.shape)}")
    ids = token_ids.long()
    valid = ids != pad_id
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, torch.where(valid, ids, 0), valid.to(torch.int32))
    return counts
