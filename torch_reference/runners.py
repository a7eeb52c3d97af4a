"""PyTorch's train and inference steps of compax's model twins (`torch_reference/models.py`), the
reference runners of experiments/bench_models.py, bench_train.py and bench_population.py
(which put the repository root on `sys.path`)."""

from torch_reference.models import TWINS, torch_model


def torch_runners(name: str, width: float, classes: int, images, labels, mean, std, batch: int,
                  threads: int | None = None):
    """(train run(n), inference run(n)) of the PyTorch twin of model `name`, warmed up; None
    without torch or for a model without a twin in torch_reference/models.py.

    `train(n)`: n Adam (lr 1e-3) steps of cross-entropy on batches of `batch` uint8 NHWC `images`
    (permuted to NCHW once, as a loader would), normalised in each step as compax's are,
    (x / 255 - mean) / std. `infer(n)`: n eval-mode forward passes of one batch under
    `torch.inference_mode`. With `threads` each run sets PyTorch's intra-op threads to it
    (`torch.set_num_threads`; the setting is global, so each run sets its own); None leaves
    PyTorch's default (one per core).
    """
    try:
        import torch
    except ImportError:
        return None
    if name not in TWINS:
        return None

    torch.manual_seed(0)
    model = torch_model(name, width, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(labels).long()
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    order = torch.randperm(len(images))
    num_steps = len(images) // batch

    def normalised(index):
        return (images[index].float() / 255 - mean) / std

    def train(n):
        if threads is not None:
            torch.set_num_threads(threads)
        model.train()
        for i in range(n):
            index = order[(i % num_steps) * batch:(i % num_steps + 1) * batch]
            loss = torch.nn.functional.cross_entropy(model(normalised(index)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    x = normalised(order[:batch])

    def infer(n):
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.inference_mode():
            for _ in range(n):
                model(x)

    train(2)
    infer(2)
    return train, infer
