#!/usr/bin/env python
"""Which Hugging Face architectures MinNorm-OG's fast projection covers with per-layer blocks.

For each model family, a tiny model built from its config with random weights (2 layers, width 32,
eager attention; no downloads) and a causal-LM or sequence-classification batch of 6 sequences of
10 tokens, one padded, goes through :func:`overunlearn.linalg.explain_projection`: the route the
projection takes (``hooked``: per-layer blocks, the rest through ``torch.func``; ``materialised``: the
whole ``torch.func`` Jacobian), the fraction of the trainable entries on blocks, and the module types
left to ``torch.func``. ``--lora`` wraps each model with a peft LoRA adapter first (rank 4; on peft's
``"all-linear"``, or on the modules ``--lora-targets`` names). A family whose config this transformers
version cannot build from these sizes is listed as such. Prints a Markdown table.

    python benchmarks/hf_coverage.py
    python benchmarks/hf_coverage.py --families llama,opt --lora
    python benchmarks/hf_coverage.py --families mixtral,qwen3_moe --lora --lora-targets q_proj,k_proj,v_proj,o_proj
"""

from __future__ import annotations

import argparse
import warnings

import torch

#: causal language models, built through AutoModelForCausalLM from these model types
CAUSAL = ("gpt2", "gpt_neox", "gpt_bigcode", "bloom", "opt", "falcon", "mpt", "llama", "mistral", "qwen2",
          "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm",
          "starcoder2", "smollm3", "cohere2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "minimax",
          "flex_olmo", "ernie4_5_moe", "cohere2_moe")
#: sequence classifiers (AutoModelForSequenceClassification)
CLASSIFIERS = ("bert", "roberta", "distilbert", "electra", "albert", "deberta-v2")

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=97, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             num_labels=3, embedding_size=32, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
             num_experts=8, num_local_experts=8)  # (fewer experts than the width, as in real models)


def build(family: str) -> tuple[torch.nn.Module, bool]:
    """The tiny model of ``family`` and whether it is a classifier."""
    import transformers as T

    sizes = {k: v for k, v in SIZES.items() if not (k == "head_dim" and family == "falcon")}  # (computed there)
    cfg = T.AutoConfig.for_model(family, **sizes)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    auto = T.AutoModelForSequenceClassification if family in CLASSIFIERS else T.AutoModelForCausalLM
    return auto.from_config(cfg, attn_implementation="eager"), family in CLASSIFIERS


#: the mixtures of experts among them (their experts and routers on ``linalg/blocks/moe.py``)
MIXTURE_OF_EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "minimax", "flex_olmo", "ernie4_5_moe",
                      "cohere2_moe")


class NotBuilt(Exception):
    """The family's tiny model cannot be built (or run) from these sizes by this transformers version."""


def report(family: str, lora: bool = False, targets: str = "all-linear"):
    """The :class:`~overunlearn.linalg.ProjectionReport` of ``family``'s tiny model (with a LoRA adapter on
    ``targets``: peft's ``"all-linear"`` or comma-separated module names)
    on 6 sequences of 10 tokens, one padded; :class:`NotBuilt` if the model cannot be built or run."""
    from overunlearn.linalg import explain_projection
    from overunlearn.problem import CausalLMTask, ClassificationTask

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    try:
        model, classifier = build(family)
        if lora:
            import peft

            names = targets if targets == "all-linear" else targets.split(",")
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=names))
        model(**inputs)
    except Exception as exc:  # noqa: BLE001 - this transformers version cannot build it from these sizes
        raise NotBuilt(f"{type(exc).__name__}: {exc}") from exc
    if classifier:
        return explain_projection(model, inputs, ClassificationTask().scores)
    return explain_projection(model, inputs, CausalLMTask().scores, targets=ids.masked_fill(mask == 0, -100))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(CAUSAL + CLASSIFIERS), help="comma-separated model types")
    ap.add_argument("--lora", action="store_true", help="wrap each model with a peft LoRA adapter first")
    ap.add_argument("--lora-targets", default="all-linear",
                    help="the adapter's target modules: all-linear (default) or comma-separated names")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}"
          + (f", LoRA rank 4 on {args.lora_targets}" if args.lora else ""))
    print()
    print("| family | route | on blocks | left to torch.func |")
    print("|---|---|---|---|")
    for family in args.families.split(","):
        try:
            r = report(family, args.lora, args.lora_targets)
        except NotBuilt as exc:
            print(f"| {family} | not built here ({str(exc).split(':')[0]}) | | |")
            continue
        left = ", ".join(sorted({p.module for p in r.fallback}))
        why = f" ({r.reason})" if r.reason else ""
        print(f"| {family} | {r.path}{why} | {r.covered_fraction:.1%} | {left} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
