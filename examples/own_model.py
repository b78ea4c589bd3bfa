"""Unlearn part of the training data of your own model in a few lines.

Run: python examples/own_model.py
"""

import torch
from torch import nn

from overunlearn import Budget, ClassificationTask, TensorData, UnlearningProblem, create, unlearn

torch.manual_seed(0)

# 1. Any trained nn.Module. Here: a small MLP fitted to random data until it interpolates.
x = torch.randn(300, 20)
y = torch.randint(0, 3, (300,))
model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 3))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(300):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

# 2. Say what to forget and what to keep.
forget = TensorData(x[:30], y[:30])
retain = TensorData(x[30:], y[30:])
problem = UnlearningProblem(model, retain, forget, ClassificationTask(), batch_size=64)

# 3. Pick a method and a budget; the original model is left untouched. The unlearned copy comes
#    back on `device` ("auto": the GPU if there is one) and in train mode.
result = unlearn(problem, create("minnorm_og", lr=1e-3, reg_coef=0.1, reg_coef_decay=0.9), Budget(epochs=5),
                 seed=0, device="auto")


def accuracy(m: nn.Module, data: TensorData) -> float:
    m.eval()
    dev = next(m.parameters()).device
    with torch.no_grad():
        return (m(data.inputs.to(dev)).argmax(1).cpu() == data.targets).float().mean().item()


print(f"steps {result.record.steps}, {result.record.seconds:.2f} s")
for name, m in [("original", model), ("unlearned", result.model)]:
    print(f"{name:9s}  retain acc {accuracy(m, retain):.3f}  forget acc {accuracy(m, forget):.3f}")
