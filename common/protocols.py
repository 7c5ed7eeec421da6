"""The evaluation protocols on frozen features: k-NN, linear probe on cached features, low-shot logistic
regression, k-means clustering. Pure functions of (train features, labels, test features, labels); all results are
percentages. Which features (token, block, final norm) each paper uses is decided by the caller (common/eval.py).

- k-NN (`knn_accuracy`): cosine similarity on L2-normalised features, optionally standardised first with the
  train mean/std (eps 1e-6), k = 10 and 20, votes weighted by exp(sim / 0.07) (ml-jku/MIM-Refiner:
  src/metrics/knn.py; facebookresearch/dino: eval_knn.py).
- Linear probe on cached features (`linear_probe`, protocol `linear_cached`): BatchNorm1d(affine=False, eps 1e-6)
  + Linear (trunc-normal std 0.01), SGD momentum 0.9, no weight decay, 10 % linear warm-up then cosine, 50 epochs,
  batch 1024, lr = base lr x batch / 256 over MIM-Refiner's grid, the best test accuracy over the grid reported
  (ml-jku/MIM-Refiner: src/yamls/eval/probe; ml-jku/MAE-CT: yamls/probe.yaml). All grid heads train together.
  It trains on features of the eval transform (resize + centre crop) computed once, without the papers'
  RandomResizedCrop + flip, so it costs seconds: the fast variant, NOT the papers' protocol. The papers' probe
  (the frozen encoder run on augmented views every step, LARS for MAE) is `python -m common.probe`.
  The protocol was called `linear`; that name still selects it, with a warning, until it is removed.
- Low-shot (`lowshot`): 1, 2 and 5 labelled images per class, 3 fixed class-balanced splits (facebookresearch/msn:
  logistic_eval.py's protocol, with our own deterministic splits, as MSN's ImageNet split files do not apply to
  other data), multinomial logistic regression with L2 penalty and no intercept on features centred and
  L2-normalised per sample (cyanure `preprocess(X, centering=True, normalize=True, columns=False)`, as MSN and
  ml-jku/MIM-Refiner: offline_logreg_callback.py). cyanure's objective (1/N) sum(loss) + lambda/2 ||W||^2 with
  lambda = 0.00025 / N equals sklearn's C sum(loss) + 1/2 ||W||^2 with C = 1 / (lambda N) = 4000; sklearn's lbfgs
  replaces cyanure.
- Clustering (`cluster`): k-means with k = number of classes on L2-normalised test features (no official code: our
  choice, as are 10 k-means++ restarts), ACC after Hungarian matching (scipy.optimize.linear_sum_assignment), NMI
  and ARI from sklearn.
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from common.optim import cosine_lr

PROTOCOLS = ("knn", "perblock", "linear_cached", "lowshot", "cluster")
RENAMED = {"linear": "linear_cached"}
"""Old protocol names still accepted (with a FutureWarning): 'linear' was the cached-feature probe, renamed so that
nobody takes it for the papers' augmented probe (common/probe.py)."""
PROBE_BASE_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3, 0.5)
"""ml-jku/MIM-Refiner's probe grid {1e-4, 2e-4, 5e-4, 1e-3, ..., 0.3, 0.5}, the middle filled in the same 1-2-5
steps."""


def parse_protocols(protocols):
    """'knn', 'all', 'knn,linear_cached' or a list of those -> tuple of protocol names in PROTOCOLS order (the old
    name 'linear' is read as 'linear_cached', with a FutureWarning)."""
    names = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    names = [n.strip() for n in names if n.strip()]
    for old_name, new_name in RENAMED.items():
        if old_name in names:
            warnings.warn(f"evaluation protocol {old_name!r} is now called {new_name!r} (a probe on cached, "
                          f"un-augmented features; the papers' probe is `python -m common.probe`); use {new_name!r}.",
                          FutureWarning, stacklevel=2)
            names = [new_name if n == old_name else n for n in names]
    if "all" in names:
        return PROTOCOLS
    bad = [n for n in names if n not in PROTOCOLS]
    if bad or not names:
        raise ValueError(f"evaluation protocol {bad[0] if bad else protocols!r} is not one of "
                         f"{', '.join(PROTOCOLS + ('all',))}; pick from those.")
    return tuple(p for p in PROTOCOLS if p in names)



def _check_labels(train_y, test_y, protocol):
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError(f"{protocol} needs train and test samples, got {len(train_y)} and {len(test_y)}.")
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError(f"{protocol} needs class labels but the data has unlabelled samples (label -1); "
                         "evaluate on a labelled dataset (ImageNet layout, cifar10, stl10 or the built-in data).")


def standardize_features(train_x, test_x, eps=1e-6):
    """(x - train mean) / (train std + eps) per channel, as MIM-Refiner's k-NN `batch_normalize`."""
    mean = train_x.mean(dim=0, keepdim=True)
    std = train_x.std(dim=0, keepdim=True) + eps
    return (train_x - mean) / std, (test_x - mean) / std


@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, ks=(10, 20), temperature=0.07, standardize=False,
                 device=None, max_elements=2 ** 25):
    """Weighted k-NN classification accuracy (%), {k: acc}.

    train_x (N, F), test_x (M, F): features; *_y: int labels. Similarities are cosines of L2-normalised
    (optionally first standardised) features; the k most similar train rows vote for their class with weight
    exp(sim / temperature); the class with the largest sum wins. A k larger than N uses all N rows.
    The test set is processed in chunks of at most max_elements similarities (128 MB in fp32).
    """
    _check_labels(train_y, test_y, "k-NN")
    device = torch.device(device) if device is not None else train_x.device
    train_x, test_x = train_x.to(device).float(), test_x.to(device).float()
    train_y, test_y = train_y.to(device).long(), test_y.to(device).long()
    if standardize:
        train_x, test_x = standardize_features(train_x, test_x)
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k_max = min(max(ks), len(train_x))
    chunk = max(1, max_elements // len(train_x))
    correct = {k: 0 for k in ks}
    for start in range(0, len(test_x), chunk):
        sims = test_x[start:start + chunk] @ train_x.T                       # (chunk, N)
        top_sims, top_idx = sims.topk(k_max, dim=1)                           # sorted descending
        weights = (top_sims / temperature).exp()
        neighbour_labels = train_y[top_idx]                                   # (chunk, k_max)
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(top_idx), num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[k] += (votes.argmax(dim=1) == test_y[start:start + chunk]).sum().item()
    return {k: 100.0 * correct[k] / len(test_x) for k in ks}


def linear_probe(train_x, train_y, test_x, test_y, base_lrs=PROBE_BASE_LRS, epochs=50, batch_size=1024,
                 warmup_fraction=0.1, momentum=0.9, weight_decay=0.0, seed=0, device=None):
    """Linear probes on frozen (cached) features, one per base lr of the grid, trained together.

    Model: BatchNorm1d(F, affine=False, eps=1e-6) shared by all heads (it has no parameters, so sharing
    changes nothing) -> one Linear(F, C) per lr. SGD with momentum, lr = base_lr * batch / 256, warm-up +
    cosine per step, batch = min(batch_size, N) with the last partial batch dropped.
    Returns {'best': acc %, 'best_lr': base lr, 'grid': {base lr: test acc %}}.
    """
    _check_labels(train_y, test_y, "the linear probe")
    device = torch.device(device) if device is not None else train_x.device
    generator = torch.Generator().manual_seed(seed)
    train_x, test_x = train_x.float().to(device), test_x.float().to(device)
    train_y, test_y = train_y.long().to(device), test_y.long().to(device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    num_heads, dim = len(base_lrs), train_x.shape[1]
    batch = min(batch_size, len(train_x))
    steps_per_epoch = len(train_x) // batch
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, round(warmup_fraction * total_steps))
    lrs = torch.tensor([lr * batch / 256 for lr in base_lrs], device=device)

    norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device)
    weight = torch.empty(num_heads, dim, num_classes)                      # head h: Linear weight^T (F, C)
    torch.nn.init.trunc_normal_(weight, std=0.01, generator=generator)  # timm: a=-2, b=2
    weight = weight.permute(1, 0, 2).contiguous().to(device).requires_grad_()   # (F, heads, C)
    bias = torch.zeros(num_heads, num_classes, device=device, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    lr_shapes = [(1, num_heads, 1), (num_heads, 1)]

    def logits_of(x):                                                 # x (B, F) -> (B, heads, C), one matmul
        return (norm(x) @ weight.reshape(dim, -1)).view(len(x), num_heads, num_classes) + bias

    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            logits = logits_of(train_x[idx]).transpose(1, 2)               # (B, C, heads)
            # Sum over heads: each head's gradient is that of its own mean cross-entropy.
            targets = train_y[idx].unsqueeze(1).expand(-1, num_heads)
            loss = F.cross_entropy(logits, targets, reduction="sum") / len(idx)
            grads = torch.autograd.grad(loss, (weight, bias))
            step_lrs = lrs * cosine_lr(step, total_steps, warmup_steps, 1.0)
            with torch.no_grad():
                for param, grad, buf, shape in zip((weight, bias), grads, buffers, lr_shapes):
                    grad = grad + weight_decay * param if weight_decay else grad
                    buf.mul_(momentum).add_(grad)                           # torch.optim.SGD's momentum rule
                    param.sub_(step_lrs.view(shape) * buf)
            step += 1
    norm.eval()
    with torch.no_grad():
        correct = (logits_of(test_x).argmax(dim=2) == test_y.unsqueeze(1)).sum(dim=0)   # (heads,)
    grid = {lr: 100.0 * count / len(test_y) for lr, count in zip(base_lrs, correct.tolist())}
    best_lr = max(grid, key=grid.get)
    return {"best": grid[best_lr], "best_lr": best_lr, "grid": grid}



def lowshot_split(labels, shots, split, seed=0):
    """Indices of `shots` samples of every class, for split number `split` (sorted, int64 numpy).

    Deterministic in (labels, split, seed); nested in shots (the 1-shot set of a split is inside its 2-shot
    set), because every class draws one permutation from a generator seeded by (seed, split, class)."""
    labels = np.asarray(labels)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} training samples, fewer than {shots} shots; "
                             "lower the shots or use a larger training set.")
        rng = np.random.default_rng([seed, split, int(cls)])
        chosen.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(chosen))


def lowshot_preprocess(x):
    """Per sample: subtract its mean over channels, then L2-normalise (cyanure preprocess, columns=False)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def lowshot(train_x, train_y, test_x, test_y, shots=(1, 2, 5), splits=3, seed=0, lambd=0.00025, max_iter=300):
    """Extreme low-shot logistic regression; returns {shots: {'mean', 'std', 'accs'}} in % over the splits.

    lambd: cyanure's lambda * N (MSN / MIM-Refiner use lambda = 0.00025 / N), i.e. sklearn C = 1 / lambd."""
    from sklearn.linear_model import LogisticRegression     # optional heavy import: only for low-shot

    _check_labels(torch.as_tensor(train_y), torch.as_tensor(test_y), "low-shot")
    if len(np.unique(np.asarray(train_y))) < 2:
        raise ValueError("low-shot classification needs at least 2 classes in the train split, the data has one.")
    train_x, test_x = lowshot_preprocess(train_x), lowshot_preprocess(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    results = {}
    for n_shots in shots:
        accs = []
        for split in range(splits):
            idx = lowshot_split(train_y, n_shots, split, seed)
            classifier = LogisticRegression(C=1.0 / lambd, fit_intercept=False, max_iter=max_iter, tol=1e-4)
            classifier.fit(train_x[idx], train_y[idx])
            accs.append(100.0 * float((classifier.predict(test_x) == test_y).mean()))
        results[n_shots] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs}
    return results


def clustering_accuracy(labels, assignments):
    """ACC (%): accuracy after the best one-to-one matching of clusters to classes (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment        # optional heavy import: only for clustering

    labels, assignments = np.asarray(labels), np.asarray(assignments)
    size = max(labels.max(), assignments.max()) + 1
    counts = np.zeros((size, size), dtype=np.int64)                  # counts[cluster, class]
    np.add.at(counts, (assignments, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return 100.0 * counts[rows, cols].sum() / len(labels)


def cluster(x, y, num_clusters=None, seed=0, n_init=10):
    """k-means (k = number of classes) on L2-normalised features -> {'acc', 'nmi', 'ari'} in %."""
    from sklearn.cluster import KMeans                      # optional heavy imports: only for clustering
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y = np.asarray(y)
    if (y < 0).any():
        raise ValueError("clustering metrics need class labels but the data has unlabelled samples (label -1); "
                         "evaluate on a labelled dataset.")
    num_clusters = num_clusters or len(np.unique(y))
    x = F.normalize(torch.as_tensor(x).float(), dim=1).numpy()
    assignments = KMeans(num_clusters, n_init=n_init, random_state=seed).fit_predict(x)
    return {"acc": clustering_accuracy(y, assignments),
            "nmi": 100.0 * normalized_mutual_info_score(y, assignments),
            "ari": 100.0 * adjusted_rand_score(y, assignments)}
