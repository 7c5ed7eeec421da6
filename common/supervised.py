"""A supervised ViT on the built-in data: the upper scale for every self-supervised number on it.

    python -m common.supervised                       # vit_mini, 32 px built-in shapes, labels used
    python -m common.supervised --epochs 30 --device cuda

Trains the common ViT with a linear classifier on the CLS token after the final norm (cross-entropy, AdamW,
warm-up + cosine, MAE's crop + flip augmentation), then reports the val top-1 of the classifier and the k-NN
accuracy of the frozen CLS features with the same protocol as every method (common.eval.evaluate), so the
README can put raw pixels (lower scale), the self-supervised methods and this (upper scale) side by side.
It is a baseline, not a method: it has no resume or distributed support.
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data, eval as evaluation
from common.vit import create_vit


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default="vit_mini", help="ViT preset (common/vit.py)")
    parser.add_argument("--data", default=None, help="None/'builtin', or a labelled folder / cifar10 / stl10")
    parser.add_argument("--img_size", type=int, default=32, help="training and evaluation resolution")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--batch_size", type=int, default=128, help="batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warm-up epochs")
    parser.add_argument("--num_classes", type=int, default=10, help="classes of --data (the built-in data has 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--output_dir", default="runs/supervised", help="where eval.jsonl is written")
    return parser.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_set = data.build_dataset(args.data, "train", data.mae_transform(args.img_size), seed=args.seed)
    val_set = data.build_dataset(args.data, "val", data.eval_transform(args.img_size), seed=args.seed)
    loader = data.build_loader(train_set, args.batch_size, None, train=True, num_workers=args.num_workers,
                                seed=args.seed)
    val_loader = data.build_loader(val_set, 256, None, train=False, num_workers=args.num_workers)

    vit = create_vit(args.model, img_size=args.img_size).to(device)
    head = nn.Linear(vit.embed_dim, args.num_classes).to(device)
    params = [p for p in list(vit.parameters()) + list(head.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=args.lr)
    total, warmup = args.epochs * len(loader), int(args.warmup_epochs * len(loader))
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        data.set_epoch(loader, epoch)
        vit.train()
        for images, labels, _ in loader:
            lr = args.lr * (step / max(1, warmup) if step < warmup else
                            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = head(vit.forward_features(images.to(device))[:, 0])
            loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs} | loss {loss.item():.3f} | {time.time() - start:.0f} s", flush=True)

    vit.eval()
    correct = count = 0
    with torch.no_grad():
        for images, labels, _ in val_loader:
            correct += (head(vit.forward_features(images.to(device))[:, 0]).argmax(1).cpu() == labels).sum().item()
            count += len(labels)
    print(f"supervised {args.model}: val top-1 {100 * correct / count:.2f} % ({count} images)")
    evaluation.evaluate(vit, args.data, args.img_size, protocols=("knn",), out_dir=args.output_dir,
                        name=f"supervised {args.model}", num_workers=args.num_workers)


if __name__ == "__main__":
    main()
