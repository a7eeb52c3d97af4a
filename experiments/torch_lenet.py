"""PyTorch's LeNet-5 training steps, the reference of experiments/bench_train.py and
experiments/bench_population.py (imported from the scripts' directory)."""


def torch_runner(images, labels, mean, std, batch: int, threads: int | None = None):
    """`run(n)`: n PyTorch train steps of the same model, warmed up; None without torch.

    With `threads` each run sets PyTorch's intra-op threads to it (`torch.set_num_threads`; the
    setting is global, so each run sets its own); None leaves PyTorch's default (one per core).
    """
    try:
        import torch
    except ImportError:
        return None
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84),
        nn.ReLU(), nn.Linear(84, 43))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NCHW uint8, as a loader
    labels = torch.from_numpy(labels).long()
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    order = torch.randperm(len(images))
    num_steps = len(images) // batch

    def run(n):
        if threads is not None:
            torch.set_num_threads(threads)
        for i in range(n):
            index = order[(i % num_steps) * batch:(i % num_steps + 1) * batch]
            x = (images[index].float() / 255 - mean) / std
            loss = nn.functional.cross_entropy(model(x), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    run(2)
    return run
