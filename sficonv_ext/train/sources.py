"""From DATA arguments to the sample lists a command works on."""
from . import builtin_data
from .config import BUILTIN_DEFAULTS
from .data import drop_missing, hold_out, load_samples, read_list_file
from .distributed import barrier


def _builtin(cfg, ctx, log):
    # eval of a run trained on builtin: that run's image side (see evaluate.builtin_settings).
    size = (cfg.get("builtin_image_size") or cfg.get("image_size")
            or BUILTIN_DEFAULTS["image_size"])

    def build(log_fn):
        return builtin_data.builtin_lists(size, cfg["builtin_images"],
                                          cache_root=cfg.get("cache_dir"),
                                          progress=cfg.get("progress", True), log=log_fn)
    # Rank 0 builds the cache; the others then find it complete.
    if ctx.is_main:
        lists = build(log)
    barrier(ctx)
    if not ctx.is_main:
        lists = build(lambda *_: None)
    return lists


def training_sets(cfg, ctx, log):
    """``(train, val, missing_train, missing_val)``: the sample lists for ``sficonv train`` and
    how many of each named an image that is not there (dropped from the lists)."""
    if cfg["data"] == "builtin":
        train_list, val_list = _builtin(cfg, ctx, log)
        train = read_list_file(train_list)
        val = read_list_file(val_list) if cfg.get("val_data") is None else None
    else:
        train = load_samples(cfg["data"])
        val = None
        if cfg.get("val_data") is None:
            train, val = hold_out(train, cfg["val_fraction"], cfg["seed"])
            log(f"held out {len(val)} of {len(train) + len(val)} images of {cfg['data']} for "
                f"validation (seed {cfg['seed']})")
            if not any(s.video for s in train + val):
                log("note: the split is per image (this data names no videos): frames of one "
                    "video may be on both sides. Give --val-data, or lay frames out as "
                    "real/<video>/ and fake/<video>/ folders")
    if cfg.get("val_data") is not None:
        val = evaluation_set(cfg["val_data"], cfg, ctx, log)
    train, missing_train = drop_missing(train, cfg["strict"], log)
    val, missing_val = drop_missing(val, cfg["strict"], log)
    return train, val, missing_train, missing_val


def evaluation_set(spec, cfg, ctx, log):
    """Samples of an eval DATA argument (``builtin``: the built-in validation split)."""
    if spec == "builtin":
        return read_list_file(_builtin(cfg, ctx, log)[1])
    return load_samples(spec)
