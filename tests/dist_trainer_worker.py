"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2` (gloo, CPU); writes OUT_DIR/rank{r}.pt.

1. all_gather_grad / all_gather on rank-dependent tensors: values, and the gradient of a rank-dependent loss.
2. A Trainer run with DDP, a global batch of 16 in micro-batches of 4 on 2 processes (2 accumulation steps:
   no_sync on the first micro-batch) and --max_steps: the parameters after training and the checkpoint written
   through the collective state().
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common import config, data, distributed, optim, trainer as training  # noqa: E402


def main():
    out_dir = sys.argv[1]
    args = config.parse_args("worker", {"tiny": dict(epochs=2, global_batch=16, batch_size=4)}, None,
                             ["--output_dir", os.path.join(out_dir, "run"), "--device", "cpu", "--max_steps", "3",
                              "--lr", "0.01", "--warmup_epochs", "0", "--log_every", "1"])
    dist = training.setup(args)
    rank = dist.rank
    result = {"world_size": dist.world_size}

    x = (torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank).requires_grad_()
    gathered = distributed.all_gather_grad(x)
    weights = (rank + 1) * torch.arange(12, dtype=torch.float32).view(6, 2)
    (gathered * weights).sum().backward()
    result.update(gathered=gathered.detach(), grad=x.grad, plain=distributed.all_gather(x.detach() * 2))

    dataset = data.build_dataset(None, "train", data.eval_transform(32), n_per_class=4)
    loader = data.build_loader(dataset, args.batch_size, dist, train=True, seed=args.seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 8, 8), nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(optim.param_groups(model.named_parameters(), args.weight_decay), lr=args.lr)
    ddp_model = distributed.wrap_ddp(model, dist)
    trainer = training.Trainer(args, ddp_model, optimizer, loader, dist)
    seen = []
    for images, labels, indices in trainer:
        seen.append(indices)
        with trainer.micro_batch():
            loss = nn.functional.cross_entropy(ddp_model(images), labels)
        trainer.step(loss)
    trainer.finish()
    result.update(params=[p.detach().clone() for p in model.parameters()], seen=torch.cat(seen),
                  steps=trainer.global_step)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


if __name__ == "__main__":
    main()
