"""Added per-call cost of the thread-safe guard and the wider finiteness check, digits CNN, batch 1."""
import statistics, sys, timeit
from contextlib import contextmanager, nullcontext
import torch
sys.path.insert(0, ".")
from torchvis.apps.digits import DigitsCNN
from torchvis.core.forward import guarded, restored_modes
torch.set_num_threads(1)

@contextmanager
def old_guarded(model, x, *, eval_mode=True, grad=True):  # the guard before this branch
    if grad and torch.is_inference_mode_enabled():
        raise RuntimeError
    with restored_modes(model) as modes, torch.random.fork_rng(devices=[]):
        if eval_mode and any(t for _, t in modes):
            model.eval()
        with torch.enable_grad() if grad else nullcontext():
            yield

def old_check(logits):
    if torch.isnan(logits).any():
        raise ValueError

from torchvis.core.forward import check_finite
x = torch.randn(1, 1, 28, 28)
for mode in ("eval", "train"):
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    model.train(mode == "train")
    def new():
        with guarded(model, x):
            pass
    def old():
        with old_guarded(model, x):
            pass
    n, diffs, news, olds = 2000, [], [], []
    for r in range(15):
        a = timeit.timeit(new if r % 2 else old, number=n) / n * 1e6
        b = timeit.timeit(old if r % 2 else new, number=n) / n * 1e6
        nw, od = (a, b) if r % 2 else (b, a)
        news.append(nw); olds.append(od); diffs.append(nw - od)
    q = statistics.quantiles(diffs, n=4)
    print(f"guard, {mode}-mode model: new {statistics.median(news):.1f} us, old {statistics.median(olds):.1f} us, "
          f"added {statistics.median(diffs):.1f} us (IQR {q[0]:.1f} to {q[2]:.1f}, 15 paired repeats)")
logits = torch.randn(1, 10); grad = torch.randn(1, 1, 28, 28)
diffs = []
for r in range(15):
    a = timeit.timeit(lambda: check_finite(logits, grad), number=2000) / 2000 * 1e6
    b = timeit.timeit(lambda: old_check(logits), number=2000) / 2000 * 1e6
    diffs.append(a - b)
q = statistics.quantiles(diffs, n=4)
print(f"finiteness check (logits + input gradient) vs isnan(logits): added {statistics.median(diffs):.1f} us "
      f"(IQR {q[0]:.1f} to {q[2]:.1f})")
from torchvis.methods.gradient import saliency
model = DigitsCNN(generator=torch.Generator().manual_seed(0)).eval()
t = [timeit.timeit(lambda: saliency(model, x, 3), number=200) / 200 * 1e6 for _ in range(7)]
print(f"saliency, digits CNN, batch 1, eval model: {statistics.median(t):.0f} us a call (median of 7)")
