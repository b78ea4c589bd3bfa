"""Unlearn memorised facts from a Hugging Face causal language model (tiny GPT-2 or Mixtral, built from a config).

The model memorises one generated fact per person ("alice lives in paris"); the facts of four people are
then unlearned with MinNorm-OG and with NPO. Prompts are masked with -100 labels (Hugging Face's
convention), so only the answer tokens are scored. Printed: the mean log-likelihood of the answers and
the exact-match rate on the forget and retain people, before and after. No downloads; about 20 s on a CPU.

Run: python examples/hf_causal_lm.py      (needs the hf extra: pip install 'overunlearn[hf]')
     python examples/hf_causal_lm.py --model mixtral    (a mixture of experts: 4 experts, top-2)
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

from overunlearn import Budget, TensorData, UnlearningProblem, create, unlearn
from overunlearn.problem import CausalLMTask

parser = argparse.ArgumentParser(description="Unlearn memorised facts from a tiny Hugging Face causal LM.")
parser.add_argument("--model", choices=["gpt2", "mixtral"], default="gpt2")
args = parser.parse_args()
torch.manual_seed(0)

# 1. Generated facts, a word-level vocabulary, and token tensors (prompt positions labelled -100).
names = ["ada", "ben", "cy", "dee", "eve", "fay", "gus", "hal", "ivy", "jo", "kim", "lu", "max", "ned", "oz", "pia",
         "quin", "rex", "sol", "tia", "uma", "vic", "wes", "xia"]
cities = ["paris", "oslo", "lima", "rome", "kyiv", "baku", "doha", "riga"]
facts = [(n, cities[int(torch.randint(0, len(cities), (1,)))]) for n in names]
vocab = ["<pad>", "lives", "in", *names, *cities]
tok = {w: i for i, w in enumerate(vocab)}
ids = torch.tensor([[tok[n], tok["lives"], tok["in"], tok[c]] for n, c in facts])
labels = ids.clone()
labels[:, :3] = -100  # score the city only
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

# 2. A tiny model trained until it answers every fact (the interpolation regime).
if args.model == "gpt2":
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=48, n_head=2, vocab_size=len(vocab), n_positions=8,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0))
else:  # its router and fused experts take MinNorm-OG's mixture-of-experts block
    model = MixtralForCausalLM(MixtralConfig(num_hidden_layers=1, hidden_size=48, intermediate_size=48,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                             num_experts_per_tok=2, vocab_size=len(vocab), max_position_embeddings=8,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0))
task = CausalLMTask()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for _ in range(120):
    opt.zero_grad()
    task.per_sample_loss(model(**inputs), labels).mean().backward()
    opt.step()

# 3. Forget the first four people, keep the rest.
data = TensorData(inputs, labels)
forget, retain = data.subset(range(4)), data.subset(range(4, len(names)))
problem = UnlearningProblem(model, retain, forget, task, batch_size=8)


def report(name: str, m: torch.nn.Module) -> None:
    m.eval()
    with torch.no_grad():
        parts = []
        for d in (forget, retain):
            out = m(**d.inputs)
            loglik = task.scores(out, d.targets).mean().item()
            exact = (out.logits[:, 2].argmax(-1) == d.targets[:, 3]).float().mean().item()
            parts.append(f"log-lik {loglik:7.3f}  exact {exact:.2f}")
    print(f"{name:24s} forget: {parts[0]}   retain: {parts[1]}")


report("original", model)
route = create("minnorm_og", grad_sample_size=20).explain(problem)  # (print(route) lists every parameter)
print(f"MinNorm-OG's projection: {route.path}, {route.covered_fraction:.0%} of the parameters on per-layer blocks")
# GD shows the vanishing retain gradient of an interpolating model (paper, Theorem 1); the last run shows
# what a too-large reg_coef does (one projection shrinks almost every weight by about reg_coef).
runs = {"gd": {"lr": 1e-2},
        "minnorm_og": {"lr": 1e-2, "reg_coef": 0.2, "reg_coef_decay": 0.8, "grad_sample_size": 20},
        "npo": {"lr": 1e-3, "reg_coef": 0.1},
        "minnorm_og reg_coef=0.5": {"lr": 1e-2, "reg_coef": 0.5, "reg_coef_decay": 0.8, "grad_sample_size": 20}}
results = {}
for label, hyper in runs.items():
    results[label] = unlearn(problem, create(label.split()[0], **hyper), Budget(epochs=20), seed=0, device="cpu")
    report(label, results[label].model)
