"""Train the bundled demo model: a small DeepSeek-V3-architecture MoE and its BPE tokenizer, on this CPU.

    python tools/train_demo.py                        # train (≈ 17 min on 2 cores) and write models/demo/
    python tools/train_demo.py --minutes 3 --out /tmp/demo   # a quick, worse model elsewhere
    python tools/train_demo.py prepare-corpus cano.txt       # one-off: the corpus files from the canon text

The corpus is the public-domain Sherlock Holmes stories of Arthur Conan Doyle (models/demo/corpus/README.md);
`heldout.txt` there is never trained on. Training uses transformers' `DeepseekV3ForCausalLM` (the project's
oracle) on the same config: AdamW, a cosine schedule that also follows the wall clock, and DeepSeek-V3's
auxiliary-loss-free balancing (the router's `e_score_correction_bias` moves against each expert's load). The
result goes through moemesh's loader and writer:

    models/demo/config.json, model.safetensors     FP8 blocks (e4m3 + weight_scale_inv per 128x128 block)
    models/demo/tokenizer.json, tokenizer_config.json, generation_config.json
    models/demo/bf16/projections.safetensors       the same trained projections in BF16 (the FP8 check)

`bf16/` holds only the tensors that the FP8 file stores as e4m3; every other tensor (embeddings, LM head,
norms, router) is BF16/fp32 in both versions, so `assemble_bf16` rebuilds the full BF16 checkpoint from the
two. The helpers at the bottom (held-out chunks, perplexity, the bigram baseline) are shared with
tests/model/test_demo.py.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "models" / "demo"
HELDOUT = "heldout.txt"
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class TrainOptions:
    out_dir: Path = DEMO_DIR
    corpus_dir: Path = DEMO_DIR / "corpus"
    vocab_size: int = 4096
    context: int = 256  # tokens per training sequence; also max_position_embeddings
    batch_size: int = 16  # sequences per step
    max_steps: int = 1400
    minutes: float = 17.0  # wall-clock budget of the training loop; the schedule ends by then
    threads: int = 2  # torch intra-op threads; 1 is much faster while other processes hold a core
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 60
    weight_decay: float = 0.1
    bias_update_speed: float = 1e-2  # DeepSeek-V3 uses 1e-3 over far more steps
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "context", "batch_size", "max_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.minutes <= 0:
            raise ValueError(f"minutes={self.minutes} must be > 0")


def model_config_kwargs(opts: TrainOptions) -> dict:
    """The architecture, in transformers' DeepseekV3Config names. Projections are multiples of 128 except
    kv_a_proj_with_mqa (160 rows: kv_lora_rank + qk_rope_head_dim), which exercises FP8 edge blocks."""
    return dict(
        vocab_size=opts.vocab_size,
        hidden_size=256,
        intermediate_size=512,  # the dense first layer
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        max_position_embeddings=opts.context,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,  # no multi-token-prediction layer is trained
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )


# ---------------------------------------------------------------------------------------------- corpus

# (file, first line of the book in the canon text, the line that follows it)
_BOOKS = (
    ("study_in_scarlet.txt", "A STUDY IN SCARLET", "THE SIGN OF THE FOUR"),
    ("sign_of_the_four.txt", "THE SIGN OF THE FOUR", "THE ADVENTURES OF SHERLOCK HOLMES"),
    ("adventures.txt", "THE ADVENTURES OF SHERLOCK HOLMES", "THE MEMOIRS OF SHERLOCK HOLMES"),
    ("memoirs.txt", "THE MEMOIRS OF SHERLOCK HOLMES", "THE RETURN OF SHERLOCK HOLMES"),
    ("return.txt", "THE RETURN OF SHERLOCK HOLMES", "THE HOUND OF THE BASKERVILLES"),
    ("hound.txt", "THE HOUND OF THE BASKERVILLES", "THE VALLEY OF FEAR"),
)
_HELDOUT_STORY = ("THE ADVENTURE OF THE SIX NAPOLEONS", "THE ADVENTURE OF THE THREE STUDENTS")


def _reflow(lines: list[str]) -> str:
    """The canon's fixed-width text as paragraphs: body lines (indented 5) joined into one line per
    paragraph, headings (indented further) kept one per line, tables of contents and picture notes dropped."""
    paragraphs, block, in_contents = [], [], False
    for line in [*lines, ""]:
        if line.strip():
            block.append(line.rstrip())
            continue
        if not block:
            continue
        indent = min(len(b) - len(b.lstrip()) for b in block)
        text = [b.strip() for b in block]
        block = []
        if text[0].lower() == "table of contents":
            in_contents = True
            continue
        in_contents = in_contents and indent >= 8 and len(text) >= 3 and not text[0].isupper()
        if in_contents or text[0].startswith("[ Picture"):
            continue
        if indent >= 8:
            paragraphs.append("\n".join(text))
        else:
            paragraphs.append(" ".join(text))
    return "\n\n".join(p for p in paragraphs if p) + "\n"


def prepare_corpus(canon: Path, corpus_dir: Path) -> None:
    """Splits the canon text (sherlock-holm.es "cano.txt", v3.1) into one file per book and the held-out
    story. Writes only what it derives from `canon`; corpus_dir/README.md is kept by hand."""
    lines = canon.read_text(encoding="utf-8").splitlines()
    titles = [line.strip() for line in lines]

    def find(title: str, start: int = 0) -> int:
        for i in range(start, len(lines)):
            if titles[i] == title and lines[i].startswith(" " * 10):
                return i
        raise ValueError(f"{canon}: title {title!r} not found after line {start}")

    first = find("A STUDY IN SCARLET", 90)  # past the table of contents at the top
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for file, title, next_title in _BOOKS:
        begin = find(title, first)
        end = find(next_title, begin + 1)
        book = lines[begin:end]
        if file == "return.txt":
            h0 = find(_HELDOUT_STORY[0], begin) - begin
            h1 = find(_HELDOUT_STORY[1], begin) - begin
            (corpus_dir / HELDOUT).write_text(_reflow(book[h0:h1]))
            book = book[:h0] + book[h1:]
        (corpus_dir / file).write_text(_reflow(book))


def training_files(corpus_dir: Path) -> list[Path]:
    files = sorted(p for p in corpus_dir.glob("*.txt") if p.name != HELDOUT)
    if not files:
        raise FileNotFoundError(f"no training *.txt files in {corpus_dir}")
    return files


# ---------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(files: list[Path], vocab_size: int):
    """Byte-level BPE over the training files only; id 0 is the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    if tok.token_to_id(EOS) != 0:
        raise RuntimeError(f"{EOS} got id {tok.token_to_id(EOS)}, expected 0")
    return tok


def encode_files(tok, files: list[Path]) -> torch.Tensor:
    """All files as one int64 stream, each followed by EOS."""
    ids: list[int] = []
    for f in files:
        ids += tok.encode(f.read_text(), add_special_tokens=False).ids
        ids.append(tok.token_to_id(EOS))
    return torch.tensor(ids, dtype=torch.int64)


def write_tokenizer_files(tok, out_dir: Path, context: int) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": context,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    gen = {"eos_token_id": tok.token_to_id(EOS), "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- training


class LoadBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: after each step, every router's e_score_correction_bias
    moves by `speed` towards the experts that got fewer tokens than the mean (bias += speed*sign(mean-load))."""

    def __init__(self, model, speed: float):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        self.speed = speed
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self.loads = [torch.zeros(r.num_experts) for r in self.routers]
        for router, load in zip(self.routers, self.loads, strict=True):
            router.register_forward_hook(self._hook(load))

    @staticmethod
    def _hook(load: torch.Tensor):
        def count(module, args, output):
            topk_indices = output[2]  # [num_tokens, num_experts_per_tok]
            load.add_(torch.bincount(topk_indices.flatten(), minlength=load.numel()).float())

        return count

    @torch.no_grad()
    def step(self) -> float:
        """Updates the biases; returns the worst max/mean load ratio over the layers since the last step."""
        worst = 0.0
        for router, load in zip(self.routers, self.loads, strict=True):
            mean = load.mean()
            router.e_score_correction_bias += self.speed * torch.sign(mean - load)
            worst = max(worst, float(load.max() / mean.clamp_min(1)))
            load.zero_()
        return worst


def lr_at(progress: float, step: int, opts: TrainOptions) -> float:
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return opts.min_lr + (opts.lr - opts.min_lr) * cosine


def train_model(tokens: torch.Tensor, opts: TrainOptions, log=print):
    """transformers' DeepseekV3ForCausalLM trained on random windows of `tokens`. The schedule's progress is
    max(step / max_steps, elapsed / budget), so a busy machine ends early with the learning rate annealed."""
    import transformers

    torch.manual_seed(opts.seed)
    config = transformers.DeepseekV3Config(**model_config_kwargs(opts))
    config._experts_implementation = "grouped_mm"  # one grouped GEMM per projection instead of a loop
    model = transformers.DeepseekV3ForCausalLM(config).float().train()
    balancer = LoadBalancer(model, opts.bias_update_speed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(opts.seed)
    budget_s = opts.minutes * 60
    start = time.monotonic()
    smooth = None
    step = 0
    for step in range(opts.max_steps):
        progress = max(step / opts.max_steps, (time.monotonic() - start) / budget_s)
        if progress >= 1.0:
            break
        for group in optim.param_groups:
            group["lr"] = lr_at(progress, step, opts)
        starts = torch.randint(0, tokens.numel() - opts.context - 1, (opts.batch_size,), generator=gen)
        batch = torch.stack([tokens[s : s + opts.context + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits  # [batch, context, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        imbalance = balancer.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 50 == 0:
            log(
                f"step {step:5d}  loss {smooth:.3f}  lr {optim.param_groups[0]['lr']:.2e}  "
                f"max/mean expert load {imbalance:.2f}  {time.monotonic() - start:6.0f} s"
            )
    elapsed = time.monotonic() - start
    log(f"trained {step} steps ({step * opts.batch_size * opts.context} tokens) in {elapsed / 60:.1f} min")
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing


def write_checkpoint(hf_model, out_dir: Path) -> None:
    """hf_model -> transformers layout in a temp dir -> moemesh's loader -> moemesh's writer: the FP8 checkpoint
    in out_dir and the BF16 projections in out_dir/bf16/."""
    from moemesh.model.checkpoint import load_model, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(Path(tmp) / "hf")
        model = load_model(Path(tmp) / "hf", progress=False)
        for old in out_dir.glob("*.safetensors"):
            old.unlink()
        save_checkpoint(model, out_dir, fp8=True)
        save_checkpoint(model, Path(tmp) / "bf16", fp8=False)
        quantized = fp8_tensor_names(out_dir)
        with safe_open(Path(tmp) / "bf16" / "model.safetensors", "pt") as f:
            projections = {name: f.get_tensor(name) for name in sorted(quantized)}
    (out_dir / "bf16").mkdir(exist_ok=True)
    save_file(projections, out_dir / "bf16" / "projections.safetensors", metadata={"format": "pt"})


def fp8_tensor_names(model_dir: Path) -> set[str]:
    """The weights that model_dir/model.safetensors stores as e4m3 (those with a weight_scale_inv)."""
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    return {n for n in names if n + "_scale_inv" in names}


def assemble_bf16(demo_dir: Path, out_dir: Path) -> Path:
    """The BF16 version of the demo as a full checkpoint in out_dir: the FP8 file's unquantized tensors plus
    bf16/projections.safetensors in place of every e4m3 weight and its scale."""
    out_dir.mkdir(parents=True, exist_ok=True)
    quantized = fp8_tensor_names(demo_dir)
    tensors = {}
    with safe_open(demo_dir / "bf16" / "projections.safetensors", "pt") as f:
        if set(f.keys()) != quantized:
            raise ValueError(f"{demo_dir}/bf16 does not hold exactly the FP8 file's quantized weights")
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[name] = f.get_tensor(name)
    with safe_open(demo_dir / "model.safetensors", "pt") as f:
        for name in f.keys():  # noqa: SIM118
            if name not in quantized and not name.endswith("_scale_inv"):
                tensors[name] = f.get_tensor(name)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((demo_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_dir / name, out_dir / name)
    return out_dir


# ---------------------------------------------------------------------------------------------- evaluation


def heldout_chunks(tokenizer, corpus_dir: Path, chunk: int) -> list[list[int]]:
    """The held-out story's tokens in consecutive chunks of `chunk` (the last, shorter one dropped)."""
    ids = tokenizer.encode((corpus_dir / HELDOUT).read_text())
    return [ids[i : i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]


def perplexity(llm, chunks: list[list[int]]) -> float:
    """exp(mean next-token NLL) over every chunk position after the first, from `LLM.score` logits."""
    nll, count = 0.0, 0
    for ids in chunks:
        logits = llm.score(ids)[:-1]  # [len - 1, vocab]
        target = torch.tensor(ids[1:])
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def bigram_perplexity(
    train_ids: torch.Tensor, chunks: list[list[int]], vocab_size: int
) -> tuple[float, float]:
    """Add-k bigram fitted on train_ids, scored on the same positions as `perplexity`; k is the best of a
    grid on the held-out text itself (the baseline's best case). Returns (perplexity, k)."""
    pairs = train_ids[:-1] * vocab_size + train_ids[1:]
    counts = torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size).double()
    row_totals = counts.sum(1)
    prev = torch.tensor([t for ids in chunks for t in ids[:-1]])
    nxt = torch.tensor([t for ids in chunks for t in ids[1:]])
    best = (math.inf, 0.0)
    for k in (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001):
        p = (counts[prev, nxt] + k) / (row_totals[prev] + k * vocab_size)
        best = min(best, (math.exp(-p.log().mean().item()), k))
    return best


def evaluate(demo_dir: Path, corpus_dir: Path, chunk: int, log=print) -> dict[str, float]:
    from moemesh import LLM, SamplingParams

    fp8 = LLM(demo_dir, device="cpu", dtype="float32")
    chunks = heldout_chunks(fp8.tokenizer, corpus_dir, chunk)
    train_ids = torch.tensor(
        [t for f in training_files(corpus_dir) for t in (*fp8.tokenizer.encode(f.read_text()), 0)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = LLM(assemble_bf16(demo_dir, Path(tmp)), device="cpu", dtype="float32")
        result = {"fp8": perplexity(fp8, chunks), "bf16": perplexity(bf16, chunks)}
    result["bigram"], result["bigram_k"] = bigram_perplexity(train_ids, chunks, fp8.config.vocab_size)
    log(
        f"held-out perplexity ({len(chunks)} chunks of {chunk}): FP8 {result['fp8']:.2f}  "
        f"BF16 {result['bf16']:.2f}  bigram {result['bigram']:.2f} (k={result['bigram_k']})"
    )
    for prompt in SAMPLE_PROMPTS:
        text = fp8.generate([prompt], SamplingParams(max_tokens=48))[0].text
        log(f"{prompt!r} -> {text!r}")
    return result


SAMPLE_PROMPTS = ("To Sherlock Holmes she is always", '"You have been in Afghanistan, I perceive."')


# ---------------------------------------------------------------------------------------------- main


def train(opts: TrainOptions) -> None:
    torch.set_num_threads(opts.threads)
    t0 = time.monotonic()
    files = training_files(opts.corpus_dir)
    tok = train_tokenizer(files, opts.vocab_size)
    tokens = encode_files(tok, files)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; corpus: {tokens.numel()} training tokens", flush=True)
    model = train_model(tokens, opts, log=lambda s: print(s, flush=True))
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(model, opts.out_dir)
    write_tokenizer_files(tok, opts.out_dir, opts.context)
    print(f"wrote {opts.out_dir} in {(time.monotonic() - t0) / 60:.1f} min total", flush=True)
    evaluate(opts.out_dir, opts.corpus_dir, opts.context)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare-corpus":
        p = argparse.ArgumentParser(prog="train_demo.py prepare-corpus")
        p.add_argument("canon", type=Path, help="the canon text (cano.txt, v3.1)")
        p.add_argument("--corpus-dir", type=Path, default=DEMO_DIR / "corpus")
        args = p.parse_args(argv[1:])
        prepare_corpus(args.canon, args.corpus_dir)
        return 0
    p = argparse.ArgumentParser(prog="train_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEMO_DIR)
    p.add_argument("--corpus-dir", type=Path, default=DEMO_DIR / "corpus")
    p.add_argument("--minutes", type=float, default=TrainOptions.minutes, help="training-loop budget")
    p.add_argument("--max-steps", type=int, default=TrainOptions.max_steps)
    p.add_argument("--batch-size", type=int, default=TrainOptions.batch_size, help="sequences per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=TrainOptions.threads)
    p.add_argument("--evaluate-only", action="store_true", help="only report perplexities of --out")
    args = p.parse_args(argv)
    if args.evaluate_only:
        torch.set_num_threads(args.threads)
        evaluate(args.out, args.corpus_dir, TrainOptions.context)
        return 0
    train(
        TrainOptions(
            out_dir=args.out,
            corpus_dir=args.corpus_dir,
            minutes=args.minutes,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            seed=args.seed,
            threads=args.threads,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
