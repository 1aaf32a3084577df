"""Sampling throughput: asyncflow's `generate` vs transformers' `generate`, same model and batch.

Both decode the same tiny Qwen2 model (built from a config, nothing downloaded) on the
same ragged, left-padded prompts, sampling at temperature 1 for a fixed number of new
tokens (no EOS, so both produce exactly the same token count). Our sampler also runs
the native compact model of the same width and depth, for reference.

    python benchmarks/generation.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from asyncflow.operators.generation import SamplingParams, generate
from asyncflow.operators.model import CausalLM, ModelConfig


def tiny_qwen2(vocab: int, hidden: int, layers: int, max_len: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 17, (batch,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def time_ours(model, batch_prompts, new_tokens: int, reps: int) -> list[float]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, eos_id=-1, pad_id=0)
    times = []
    for rep in range(reps):
        g = torch.Generator().manual_seed(rep)
        start = time.perf_counter()
        out = generate(model, batch_prompts, params, g)
        times.append(time.perf_counter() - start)
        assert all(len(r) == new_tokens for r in out.responses)
    return times


def time_hf(hf_model, batch_prompts, new_tokens: int, reps: int) -> list[float]:
    width = max(len(p) for p in batch_prompts)
    ids = torch.zeros((len(batch_prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch_prompts):  # left padding, as transformers wants for decoding
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    times = []
    for rep in range(reps):
        torch.manual_seed(rep)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                eos_token_id=None,
            )
        times.append(time.perf_counter() - start)
        assert out.shape[1] == width + new_tokens
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: pip install 'asyncflow[hf]' to run this benchmark")
        return 1
    from asyncflow.operators.hf import HFCausalLM

    vocab, hidden, layers, new_tokens = 512, 64, 2, 32
    reps = 3 if args.quick else 7
    batches = (16, 64) if args.quick else (16, 64, 256)
    hf_model = tiny_qwen2(vocab, hidden, layers, max_len=64)
    ours_on_hf = HFCausalLM(hf_model).eval()
    native = CausalLM(ModelConfig(vocab_size=vocab, max_seq_len=64, d_model=hidden, n_layers=2))

    print(f"asyncflow generation benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {platform.machine()}, python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, threads {args.threads}"
    )
    print(f"model: Qwen2 {layers} layers x {hidden} wide, vocab {vocab}; {new_tokens} new tokens")
    header = f"{'batch':>5} | {'sampler':<34} | {'median s':>8} | {'tokens/s':>10} | vs HF"
    print(header)
    print("-" * len(header))
    results: dict[str, float] = {}
    for batch in batches:
        batch_prompts = prompts(batch, vocab)
        tokens = batch * new_tokens
        hf = statistics.median(time_hf(hf_model, batch_prompts, new_tokens, reps))
        ours = statistics.median(time_ours(ours_on_hf, batch_prompts, new_tokens, reps))
        nat = statistics.median(time_ours(native, batch_prompts, new_tokens, reps))
        for name, seconds in (
            ("transformers generate (Qwen2)", hf),
            ("asyncflow generate (same Qwen2)", ours),
            ("asyncflow generate (native LM)", nat),
        ):
            print(
                f"{batch:>5} | {name:<34} | {seconds:>8.3f} | {tokens / seconds:>10.0f} | "
                f"{hf / seconds:.2f}x"
            )
        results[f"hf_tokens_per_s_b{batch}"] = tokens / hf
        results[f"ours_hf_model_tokens_per_s_b{batch}"] = tokens / ours
        results[f"ours_native_tokens_per_s_b{batch}"] = tokens / nat
        results[f"ratio_ours_vs_hf_b{batch}"] = hf / ours
    if args.json:
        meta = {
            "date": datetime.now(timezone.utc).isoformat(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "new_tokens": new_tokens,
            "reps": reps,
        }
        with open(args.json, "w") as f:
            json.dump({**meta, **results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
