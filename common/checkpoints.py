"""Checkpoints: atomic saving, and loading of every format our users bring, into the common ViT.

    info = load_pretrained(model, "mae_pretrain_vit_huge.pth")     # detects the format, remaps, loads strictly
    vit, info = build_vit_from_checkpoint("runs/mae_ct/checkpoint.pth")   # architecture from the file

Formats detected (sources in brackets):
- ours: {'model', 'encoder', 'encoder_ema'?, 'vit', 'optimizer', 'step', 'epoch', 'args', ...}; the encoder is
  taken from 'encoder' (or 'encoder_ema' with use_ema=True).
- official MAE (facebookresearch/mae): {'model': ...}; encoder-only (`mae_pretrain_vit_*.pth`) or with the
  decoder (`*_full.pth`, `mae_visualize_*.pth`). Loading into a model with decoder keys (mae.py) takes them too.
- MoCo v3 (facebookresearch/moco-v3): {'state_dict': 'module.base_encoder.*'}; momentum encoder, predictor and
  the projection head (`head.*`) are dropped. (Also the converted DeiT form {'model': ...} with `head.*`.)
- data2vec 2.0 (ml-jku/MIM-Refiner: src/initializers/pretrained_initializer.py remaps): `modality_encoders.IMAGE.*`
  names → patch_embed / cls_token / pos_embed / embed_norm; `decoder*`, `_ema` dropped. Post-norm ViT.
- released MAE-CT weights (ml-jku/MAE-CT; torchhub-ssl `maect`): a flat state dict whose pos_embed has no
  CLS row (1, L, D); a zero CLS row is added.
- released MIM-Refiner weights (ml-jku/MIM-Refiner hubconf.py): {'state_dict': ...} with KappaModules names
  `cls_tokens.tokens`, `pos_embed.embed` (1, h, w, D).
- plain timm `VisionTransformer` state dicts (`head.*`, `fc_norm.*` dropped).
- Sense-X/MixMIM's hierarchical encoder (`absolute_pos_embed`, `layers.*`; pre-training files also hold the decoder,
  fine-tuning files the head): loaded by name into common/mixmim_hierarchical.py's model, whose names are the
  official ones (build_encoder_from_checkpoint reads its architecture from the shapes). Ours: 'mixmim' in place
  of 'vit'.

Strictness (never silently partial): after remapping, a key of the model that the file lacks, or a key of
the file that the model lacks, is an error naming the keys, except this documented allow-list:
- file keys ignored when the model has no such key: MAE decoder keys (`decoder_*`, `mask_token`),
  classification heads (`head.*`, `fc_norm.*`), MoCo v3 / MIM-Refiner head leftovers (`heads.*`, `predictor.*`);
- model keys allowed to stay fresh when the file has none of them: the MAE decoder (`decoder_*`,
  `mask_token`: an encoder-only MAE file loaded into mae.py's model; logged as "the decoder starts fresh").
A shape mismatch names both shapes. A position table of another grid is interpolated (bicubic) and logged.
"""
import logging
import os
import re
import tempfile

import torch

from common import mixmim_hierarchical
from common.vit import PRESETS, create_vit, preset_of, resize_pos_embed, vit_config

log = logging.getLogger("checkpoints")

IGNORED_FILE_KEYS = re.compile(r"^(decoder_|decoder\.|mask_token$|head\.|fc_norm\.|heads\.|predictor\.)")
FRESH_MODEL_KEYS = re.compile(r"^(decoder_|decoder\.|mask_token$)")
# Heads per embedding width for files that do not store it (timm / MAE / MoCo v3 presets).
HEADS_BY_WIDTH = {64: 2, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 2560: 32}


TMP_PREFIX = ".tmp_"
_UMASK = os.umask(0)                 # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, obj):
    """Atomic write: torch.save to a temporary file in the same directory, flushed to the disk (fsync), then
    os.replace and an fsync of the directory, so that a crash or a kill at any moment leaves either the old file or
    the new one, never a torn one. The file gets the usual permissions (0666 minus the umask), like every other
    output of a run. A failed write (a full disk, a quota, a file-size limit) removes its temporary file and raises
    OSError with the operating system's reason."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as error:
                raise _refused_write(f) or error
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:                                     # the rename itself reaches the disk with the directory's entry
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:                          # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(dir_fd)
    except OSError:                          # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def _refused_write(f):
    """torch.save's zip writer reports a write the file system cut short (the disk filled up mid-block) as a
    RuntimeError ('unexpected pos ...') that does not say why. Writing once more gets the reason from the operating
    system (ENOSPC, EDQUOT, EFBIG) as an OSError; None when the file takes the byte, i.e. the error was not a refused
    write."""
    try:
        f.write(b"\0")
        f.flush()
        os.fsync(f.fileno())
    except OSError as error:
        return error
    return None


def remove_orphans(directory):
    """Delete the temporary files a write killed mid-way left in `directory` (call it only while no other process
    writes there, i.e. holding the run directory's lock). Returns their names."""
    if not os.path.isdir(directory):
        return []
    orphans = [name for name in os.listdir(directory) if name.startswith(TMP_PREFIX) and name.endswith(".pth")]
    for name in orphans:
        os.remove(os.path.join(directory, name))
    return orphans


def read_training_checkpoint(path, script):
    """A checkpoint of our training loop, to continue from (--resume): loaded with weights_only=True, and checked to
    be one of `script`'s. Anything else (missing, empty, truncated, not a checkpoint, another script's) is a
    CheckpointError of one sentence naming the file and what to do."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {path} does not exist; give a checkpoint file of this run or 'auto' "
                              "(the run directory's checkpoint-last.pth).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"--resume {path} cannot be read as a checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:120] if str(error) else 'empty'}); it is truncated or not "
                              "one of ours: delete it to start fresh, or give another checkpoint.") from None
    missing = [k for k in ("model", "optimizer", "step", "rng") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {path} is not a training checkpoint of this code (no {', '.join(missing)}); "
                              "use --ckpt to start from its weights instead.")
    written_by = ckpt.get("args", {}).get("script")
    if written_by and written_by != script:
        raise CheckpointError(f"--resume {path} was written by {written_by}.py, not {script}.py; resume it with "
                              f"{written_by}.py, or use --ckpt to start from its weights.")
    return ckpt


def read_file(path_or_url):
    """torch.load a local path or a URL (http(s):// or file://, downloaded once into torch.hub's cache) onto the CPU."""
    if re.match(r"^(https?|file)://", str(path_or_url)):
        try:
            return torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=False)
        except Exception as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise CheckpointError(f"could not download checkpoint {path_or_url} ({reason}); download it where there "
                                  "is a network and pass --ckpt PATH.") from None
    if not os.path.isfile(path_or_url):
        raise CheckpointError(f"checkpoint {path_or_url} does not exist; pass the path of a .pth/.th/.pt file.")
    try:
        return torch.load(path_or_url, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path_or_url} could not be read by torch.load ({type(e).__name__}: "
                              f"{e}); is it a PyTorch checkpoint file?") from e


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _square_grid(num, path):
    side = int(round(num ** 0.5))
    if side * side != num:
        raise CheckpointError(f"{path}: position table has {num} rows, not a square grid; cannot place it.")
    return side


def _with_cls_row(pos, path):
    """(1, L, D) or (1, h, w, D) patch-only table -> (1, 1+L, D) with a zero CLS row."""
    if pos.dim() == 4:
        pos = pos.reshape(1, -1, pos.shape[-1])
    return torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)


def to_timm_layout(obj, path="checkpoint", use_ema=False):
    """Detect the format of a loaded checkpoint and return (format name, timm-named state dict, notes)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict; "
                              "pass a checkpoint saved by one of the supported codebases.")
    notes = []
    if "encoder" in obj and ("vit" in obj or "mixmim" in obj):
        key = "encoder_ema" if use_ema else "encoder"
        if key not in obj:
            raise CheckpointError(f"{path} has no '{key}' weights (saved without an EMA?); drop --ema.")
        fmt = "ours" if "vit" in obj else "mixmim (ours, hierarchical)"
        return fmt + (" (EMA)" if use_ema else ""), dict(obj[key]), notes
    if use_ema:
        notes.append("use_ema ignored: only our checkpoints carry a separate EMA encoder")

    sd = obj
    for wrapper in ("state_dict", "model", "teacher", "target_encoder"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
            break
    if not sd or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path} does not contain a state dict of named tensors.")
    keys = list(sd)

    if any(k.startswith("module.base_encoder.") for k in keys):
        sd = _strip(sd, "module.base_encoder.")
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        return "moco_v3", sd, notes + ["MoCo v3: momentum encoder, predictor and projection head dropped"]

    if any("modality_encoders.IMAGE." in k for k in keys):
        renames = {"modality_encoders.IMAGE.local_encoder.proj.": "patch_embed.proj.",
                   "modality_encoders.IMAGE.context_encoder.norm.": "embed_norm."}
        out = {}
        for k, v in sd.items():
            k = k[len("model."):] if k.startswith("model.") else k
            if k.startswith(("decoder", "_ema")) or ".decoder." in k or k.endswith("_ema"):
                continue
            for old, new in renames.items():
                if k.startswith(old):
                    k = new + k[len(old):]
            if k == "modality_encoders.IMAGE.extra_tokens":
                k, v = "cls_token", v[:, :1]
            elif k == "modality_encoders.IMAGE.fixed_positional_encoder.positions":
                k, v = "pos_embed", _with_cls_row(v, path)
            elif k.startswith("modality_encoders."):
                continue                                    # alibi / other modalities' leftovers
            out[k] = v
        return "data2vec2", out, notes + ["data2vec 2.0: decoder and EMA teacher dropped; post-norm ViT"]

    if "absolute_pos_embed" in sd and any(k.startswith("layers.") for k in sd):
        return "mixmim (Sense-X/MixMIM)", dict(sd), notes + ["hierarchical MixMIM encoder (official names)"]

    if "cls_tokens.tokens" in sd or "pos_embed.embed" in sd:
        out = {}
        for k, v in sd.items():
            if k == "cls_tokens.tokens":
                out["cls_token"] = v[:, :1]
            elif k == "pos_embed.embed":
                out["pos_embed"] = _with_cls_row(v, path)
            else:
                out[k] = v
        return "kappamodules (MIM-Refiner / MAE-CT release)", out, notes

    if "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        pos = sd["pos_embed"]
        num = pos.shape[1]
        if int(round(num ** 0.5)) ** 2 == num:              # no CLS row: MAE-CT release
            sd = dict(sd)
            sd["pos_embed"] = _with_cls_row(pos, path)
            return "mae_ct release (no CLS position row)", sd, notes + ["zero CLS position row added"]
        fmt = "mae" if isinstance(obj.get("model"), dict) else "timm"
        return fmt, dict(sd), notes
    raise CheckpointError(f"{path} is not a checkpoint format we know (no patch_embed / pos_embed keys, first keys: "
                          f"{keys[:5]}); supported: ours, MAE, MoCo v3, data2vec 2.0, MAE-CT, MIM-Refiner, timm.")


def _encoder_prefix(model_keys):
    for key in model_keys:
        if key.endswith("patch_embed.proj.weight"):
            return key[: -len("patch_embed.proj.weight")]
    raise CheckpointError("the model has no patch_embed.proj.weight; load_pretrained expects a ViT "
                          "or a module holding one.")


def load_pretrained(model, path_or_url, use_ema=False, obj=None):
    """Load a checkpoint of any supported format into `model` (a VisionTransformer, or a module holding one,
    e.g. MAE with its decoder keys at the top level or a method module with the ViT under `encoder.`).

    Returns a dict: format, loaded (count), ignored (file keys dropped), fresh (model keys left as they were),
    notes. Raises CheckpointError with one sentence for anything else.
    """
    obj = read_file(path_or_url) if obj is None else obj
    fmt, sd, notes = to_timm_layout(obj, path_or_url, use_ema)
    target = model.state_dict()
    prefix = _encoder_prefix(target)
    vit = model.get_submodule(prefix[:-1]) if prefix else model
    sd = {prefix + k: v for k, v in sd.items()}

    ignored = sorted(k for k in sd if k not in target and IGNORED_FILE_KEYS.match(k[len(prefix):]))
    unexpected = sorted(k for k in sd if k not in target and k not in ignored)
    missing = sorted(k for k in target if k not in sd)
    fresh = [k for k in missing if FRESH_MODEL_KEYS.match(k[len(prefix):])]
    missing = [k for k in missing if k not in fresh]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys the model needs ({', '.join(missing[:6])}"
                         f"{', ...' if len(missing) > 6 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:6])}"
                         f"{', ...' if len(unexpected) > 6 else ''})")
        raise CheckpointError(f"{path_or_url} (read as {fmt}) does not fit this model: {'; '.join(parts)}; "
                              "check that --model is the checkpoint's size.")

    pos_key = prefix + "pos_embed"
    if pos_key in sd and sd[pos_key].shape != target[pos_key].shape:
        old, new = sd[pos_key], target[pos_key]
        if old.shape[-1] != new.shape[-1]:
            raise CheckpointError(f"{path_or_url}: pos_embed has shape {tuple(old.shape)} but the model needs "
                                  f"{tuple(new.shape)}; the width differs, so this is another model size.")
        old_side = _square_grid(old.shape[1] - 1, path_or_url)
        resized = resize_pos_embed(old[:, 1:], (old_side, old_side), vit.grid_size)
        sd[pos_key] = torch.cat([old[:, :1], resized], dim=1)
        notes.append(f"pos_embed interpolated from a {old_side}x{old_side} grid to {vit.grid_size[0]}x{vit.grid_size[1]}")
    for key in sd:
        if key in target and sd[key].shape != target[key].shape:
            raise CheckpointError(f"{path_or_url}: {key} has shape {tuple(sd[key].shape)} in the file but "
                                  f"{tuple(target[key].shape)} in the model; check that --model is the checkpoint's size.")
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    if fresh:
        notes.append(f"{len(fresh)} decoder keys not in the file: the decoder starts fresh")
    info = dict(format=fmt, loaded=len(sd) - len(ignored), ignored=ignored, fresh=fresh, notes=notes)
    log.info("loaded %s as %s: %d tensors%s%s", path_or_url, fmt, info["loaded"],
             f", ignored {len(ignored)} file keys ({', '.join(ignored[:4])}{', ...' if len(ignored) > 4 else ''})"
             if ignored else "", "".join(f"; {n}" for n in notes))
    return info


def infer_vit_config(sd, fmt=""):
    """create_vit arguments from the shapes of a timm-named state dict (heads from the standard widths)."""
    weight = sd["patch_embed.proj.weight"]
    embed_dim, patch = weight.shape[0], weight.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    side = _square_grid(sd["pos_embed"].shape[1] - 1, "checkpoint")
    heads = 12 if fmt == "moco_v3" and embed_dim == 384 else HEADS_BY_WIDTH.get(embed_dim)
    if heads is None:
        raise CheckpointError(f"cannot tell the number of heads of a {embed_dim}-wide ViT from its weights (the "
                              f"standard widths are {', '.join(map(str, HEADS_BY_WIDTH))}); use a checkpoint of a "
                              "standard size, or one written by our scripts (which stores it).")
    return dict(name=preset_of(embed_dim, depth, heads, patch), embed_dim=embed_dim, depth=depth, num_heads=heads,
                patch_size=patch, img_size=side * patch, post_norm="embed_norm.weight" in sd)


def build_vit_from_checkpoint(path_or_url, use_ema=False, obj=None, **overrides):
    """Create the right ViT for a checkpoint (its architecture read from the file) and load it. Returns (vit, info);
    info also holds 'vit' (the create_vit arguments) and, for our own checkpoints, 'model_state' (the method
    module's state dict) and 'args' (the run's flags), which the two-stage scripts use to continue from a stage.
    A hierarchical MixMIM file is a CheckpointError (build_encoder_from_checkpoint builds either)."""
    obj = read_file(path_or_url) if obj is None else obj
    ours = isinstance(obj, dict) and "vit" in obj and "encoder" in obj
    if ours:
        config = dict(obj["vit"])
    else:
        fmt, sd, _ = to_timm_layout(obj, path_or_url, use_ema)
        if fmt.startswith("mixmim"):
            raise CheckpointError(f"{path_or_url} holds the hierarchical MixMIM encoder, not a ViT; use it where a "
                                  "MixMIM encoder is accepted (common.eval, common.finetune --model mixmim_b, "
                                  "mixmim.py --model mixmim_b).")
        config = infer_vit_config(sd, fmt)
    config.update(overrides)
    vit = create_vit(**config)
    info = load_pretrained(vit, path_or_url, use_ema=use_ema, obj=obj)
    info.update(vit=config, model_state=obj.get("model") if ours else None, args=obj.get("args", {}) if ours else {})
    return vit, info


def build_encoder_from_checkpoint(path_or_url, use_ema=False, **overrides):
    """The encoder of any checkpoint we read, built with the file's architecture and loaded strictly: a ViT
    (build_vit_from_checkpoint) or the hierarchical MixMIM encoder (ours, or Sense-X/MixMIM's pre-training or
    fine-tuning file, its architecture read from the shapes). Returns (encoder, info); info['vit'] is the
    create_vit arguments or None, info['mixmim'] the MixMIM config or None."""
    obj = read_file(path_or_url)
    fmt, sd, _ = to_timm_layout(obj, path_or_url, use_ema)
    if not fmt.startswith("mixmim"):
        vit, info = build_vit_from_checkpoint(path_or_url, use_ema, obj=obj, **overrides)
        return vit, dict(info, mixmim=None)
    config = dict(obj["mixmim"]) if "mixmim" in obj else mixmim_hierarchical.infer_config(sd)
    config.update(overrides)
    try:
        encoder = mixmim_hierarchical.create_mixmim_hierarchical(config.pop("name"), pretrain=False, **config)
    except ValueError as error:
        raise CheckpointError(f"{path_or_url}: {error}") from None
    info = load_pretrained(encoder, path_or_url, use_ema=use_ema, obj=obj)
    info.update(vit=None, mixmim=encoder.config(), model_state=obj.get("model") if "mixmim" in obj else None,
                args=obj.get("args", {}) if "mixmim" in obj else {})
    return encoder, info


LOCAL_MAE = os.path.join("runs", "mae", "checkpoint-last.pth")
CPU_PRESETS = ("vit_mini", "vit_micro")
# The encoder file of the default `python mae.py` run (its RUN_DIR/encoder.pth), kept in the repository so that the
# methods that start from MAE run on the built-in data without making it first (checksum and rebuild: README).
SHIPPED_MAE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "starts",
                           "mae_vit_mini_builtin.pth")
FB_MAE = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{}.pth"      # facebookresearch/mae README
MAECT_MAE = "https://ml.jku.at/research/maect/download/mae_reimpl_{}16.th"         # ml-jku/MAE-CT README
OFFICIAL_STARTS = {
    # MAE-CT's B/16, L/16 and H/16 rows start from its own 800-epoch MAE (ml-jku/MAE-CT yamls/stage1_mae), its
    # H/14 row from facebookresearch/mae's file; our vit_h preset is the /14 one (the H/16 MAE: --ckpt MAECT_MAE).
    "mae_ct": {"vit_b": MAECT_MAE.format("base"), "vit_b_aug": MAECT_MAE.format("base"),
               "vit_l": MAECT_MAE.format("large"), "vit_l_aug": MAECT_MAE.format("large"),
               "vit_h": FB_MAE.format("huge"), "vit_h_aug": FB_MAE.format("huge")},
    # MIM-Refiner (ml-jku/MIM-Refiner src/yamls/stage2/*_mae.yaml weights_file, SETUP_MODELS.md): facebookresearch's
    # MAE for L/16 and H/14, the MAWS release of MAE-2B/14 pre-trained on ImageNet-1k.
    "mim_refiner": {"vit_b": FB_MAE.format("base"), "vit_l": FB_MAE.format("large"), "vit_h": FB_MAE.format("huge"),
                    "vit_2b": "https://dl.fbaipublicfiles.com/maws/pretrain/mae_in1k/vit_2b14.pt"},
    # MimCo's teacher: MoCo v3 (facebookresearch/moco-v3 CONFIG.md), the paper's ViT-S and its ViT-B sibling.
    "mimco": {"vit_s": "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
              "vit_b": "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"},
}


def save_encoder(path, encoder, args=None):
    """The encoder alone, as a small file any script starts from (--ckpt): {'encoder', 'vit', 'args'} (our format,
    without the method's modules, optimizer and RNG state of checkpoint-last.pth). Atomic, like every save."""
    save_checkpoint(path, {"encoder": encoder.encoder_state_dict(), "vit": vit_config(encoder),
                           "args": dict(args or {})})
    return path


def default_start(script, preset, log=print, data=None):
    """The starting weights when --ckpt (MimCo: --teacher) is not given. CPU presets: the `python mae.py` run
    (runs/mae/checkpoint-last.pth) when there is one, else, for vit_mini on the built-in data, the encoder of the
    default `python mae.py` run shipped with the repository (SHIPPED_MAE). Paper presets: the official release the
    paper started from (OFFICIAL_STARTS), downloaded once into torch.hub's cache by read_file. Other presets have
    none: one sentence says so."""
    if preset in CPU_PRESETS:
        if os.path.isfile(LOCAL_MAE):
            return LOCAL_MAE
        if preset == "vit_mini" and data in (None, "builtin") and os.path.isfile(SHIPPED_MAE):
            log(f"[{script}] no --ckpt and no {LOCAL_MAE}: starting from the encoder of the default `python mae.py` "
                f"run on the built-in data, shipped as {os.path.relpath(SHIPPED_MAE)} (`python mae.py` makes your own)")
            return SHIPPED_MAE
        raise SystemExit(f"no --ckpt given and {LOCAL_MAE} does not exist; run `python mae.py` first, pass --ckpt "
                         "PATH to a pre-trained encoder, or --ckpt none for a random-init smoke test.")
    url = OFFICIAL_STARTS.get(script, {}).get(preset)
    if url is None:
        raise SystemExit(f"no --ckpt given for --model {preset}, and the paper has no released start for it; pass "
                         "--ckpt PATH or URL of a pre-trained encoder, or --ckpt none for a smoke test.")
    log(f"[{script}] no --ckpt: starting from the weights the paper used, {url} (downloaded once into "
        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')})")
    return url


def start_from(path_or_url, model=None, use_ema=False, what="--ckpt", preset=None, **overrides):
    """The one way a script loads its starting weights: into `model` (a ViT or a module holding one, loaded
    strictly with load_pretrained), or, with model=None, into a ViT built from the file (build_vit_from_checkpoint,
    `overrides` e.g. img_size; `preset`: the ViT preset the run's recipe is for, whose width and depth the file must
    have). A bad file ends the run with one sentence naming it. Returns (vit or model, info)."""
    try:
        if model is not None:
            return model, load_pretrained(model, path_or_url, use_ema=use_ema)
        vit, info = build_vit_from_checkpoint(path_or_url, use_ema=use_ema, **overrides)
    except CheckpointError as error:
        raise SystemExit(f"{what}: {error}") from None
    if preset in PRESETS and (vit.embed_dim, vit.depth) != PRESETS[preset][:2]:
        width, depth = PRESETS[preset][:2]
        raise SystemExit(f"{what} {path_or_url} holds a ViT of width {vit.embed_dim} and depth {vit.depth}, but "
                         f"--model {preset} is {width} wide and {depth} deep; pass the matching --model.")
    return vit, info
