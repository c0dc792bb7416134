"""How far Adam moves the shared layers just after a task switch: kept vs fresh optimizer.

Split MNIST, task-incremental (van de Ven & Tolias's protocol: 2×400 ReLU, Adam lr 1e-3, batch
128, 2,000 iterations on task 0/1), then the first steps on task 2/3 with the same optimizer
(its moment estimates and step count kept) or a fresh one. Prints, per variant, the RMS and the
largest per-weight update of the hidden layers in units of lr, over the first 10, 100 and 2,000
steps of the second task, and the accuracy on the first task after them.

    python docs/adam_task_switch.py /work/shared/data/mnist
"""

import copy
import sys

import torch

from ewc.data import make_stream
from ewc.experiments.models import MLP


def main(root: str) -> None:
    torch.manual_seed(0)
    stream = make_stream("split-mnist", source="mnist", root=root, val_fraction=0.0)
    t0, t1 = stream[0], stream[1]
    net = MLP(784, (400, 400), 2, heads=5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def steps(model, optim, task, t, n):
        x, y = task.x_train, task.y_train
        for _ in range(n):
            idx = torch.randint(0, len(y), (128,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[idx], t), y[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()

    steps(net, opt, t0, 0, 2000)
    xa, ya = t0.x_test, t0.y_test
    print(f"task 0 after 2,000 steps: {100 * (net.predict(xa, 0) == ya).double().mean():.2f} %")
    state = copy.deepcopy((net.state_dict(), opt.state_dict()))
    for variant in ("kept", "fresh"):
        net.load_state_dict(state[0])
        o = torch.optim.Adam(net.parameters(), lr=1e-3)
        if variant == "kept":
            o.load_state_dict(state[1])
        gen.manual_seed(1)  # the same minibatches for both variants
        body = [p for n, p in net.named_parameters() if n.startswith("body")]
        start = [p.detach().clone() for p in body]
        done = 0
        for n in (10, 100, 2000):
            steps(net, o, t1, 1, n - done)
            done = n
            d = torch.cat([(p.detach() - s).flatten() for p, s in zip(body, start, strict=True)])
            acc = 100 * (net.predict(xa, 0) == ya).double().mean()
            print(
                f"{variant:5s} optimizer, {n:4d} steps of task 1: hidden-layer update RMS "
                f"{d.pow(2).mean().sqrt() / 1e-3:6.2f} lr, max {d.abs().max() / 1e-3:7.1f} lr; "
                f"task 0 accuracy {acc:.2f} %"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/mnist")
